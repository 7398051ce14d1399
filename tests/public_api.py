"""The public API as the coverage tests see it: transform factories and the other callables."""

import inspect

import gradsafe as gs

# Public callables that are not transform factories (helpers, metrics, masks).
NOT_TRANSFORMS = frozenset(
    {
        "global_norm",
        "largest_leaves",
        "leaf_norms",
        "loss_scale",
        "metrics",
        "path_mask",
        "skip_reason",
        "unit_axes",
    }
)


def public_factories() -> set[str]:
    """Public names whose return annotation is an Optax gradient transformation."""
    names = set()
    for name in gs.__all__:
        obj = getattr(gs, name)
        if inspect.isfunction(obj):
            annotation = str(inspect.signature(obj).return_annotation)
            if "GradientTransformation" in annotation:
                names.add(name)
    return names
