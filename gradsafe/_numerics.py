"""Shared arithmetic: leaf rules, norms, safe scale factors, hyperparameters, reductions.

Every transform in gradsafe computes its norms and scale factors here, so that the numerics
rules of the design (float32 accumulation, pass-through leaves, finite gradients at zero,
cross-device reductions) hold everywhere at once.

Leaf rules:

* A *float leaf* is an array of a real floating or complex dtype. Only float leaves are
  transformed and only they count toward norms.
* Integer, bool and ``float0`` arrays, ``None`` and :class:`optax.MaskedNode` pass through
  unchanged (``None`` and ``MaskedNode`` are empty subtrees for ``jax.tree``).
* Reductions accumulate in float32, or in float64 when the leaf is float64/complex128 (x64).
  Complex leaves contribute ``|z|^2 = re^2 + im^2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax

AxisName = str | tuple[str, ...] | None
Schedule = Callable[[jax.Array], jax.typing.ArrayLike]
ScalarOrSchedule = float | jax.typing.ArrayLike | Schedule

# The message Optax raises when a transform that needs params gets none.
NO_PARAMS_MSG = (
    "You are using a transformation that requires the current value of parameters, but you are"
    " not passing `params` when calling `update`."
)

# --------------------------------------------------------------------------------------------
# Leaf rules and dtypes
# --------------------------------------------------------------------------------------------


def is_float_leaf(x: Any) -> bool:
    """Whether ``x`` is an array that gradsafe transforms (real floating or complex dtype)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or dtype == jax.dtypes.float0:
        return False
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """float64 for float64/complex128 leaves (only possible under x64), float32 otherwise."""
    if jnp.dtype(dtype) in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128)):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def float_leaves(tree: Any) -> list[jax.Array]:
    """The float leaves of ``tree``, in ``jax.tree.leaves`` order."""
    return [x for x in jax.tree.leaves(tree) if is_float_leaf(x)]


def tree_accumulation_dtype(tree: Any) -> jnp.dtype:
    """The accumulation dtype for a reduction over every float leaf of ``tree``."""
    dtypes = {accumulation_dtype(x.dtype) for x in float_leaves(tree)}
    return jnp.dtype(jnp.float64) if jnp.dtype(jnp.float64) in dtypes else jnp.dtype(jnp.float32)


def map_float_leaves(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """``jax.tree.map(fn, tree, *rest)`` on float leaves of ``tree``; other leaves pass through."""

    def apply(x: Any, *others: Any) -> Any:
        return fn(x, *others) if is_float_leaf(x) else x

    return jax.tree.map(apply, tree, *rest)


def abs_sq(x: jax.Array) -> jax.Array:
    """``|x|^2`` element-wise, in the accumulation dtype of ``x``."""
    acc = accumulation_dtype(x.dtype)
    if jnp.iscomplexobj(x):
        return jnp.square(x.real.astype(acc)) + jnp.square(x.imag.astype(acc))
    return jnp.square(x.astype(acc))


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` whose derivative is 0 (not Inf or NaN) at ``x = 0``; NaN stays NaN."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), x * 0).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Norm types
# --------------------------------------------------------------------------------------------

_NORM_TYPES = (1.0, 2.0, math.inf)


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a tracer (e.g. a hyperparameter under ``inject_hyperparams`` + ``jit``)."""
    return isinstance(x, jax.core.Tracer)


def check_norm_type(norm_type: Any) -> None:
    """Raise ``ValueError`` unless ``norm_type`` is 1, 2 or inf (or an array, checked later)."""
    if isinstance(norm_type, str):
        if norm_type.lower() not in ("inf", "infinity"):
            raise ValueError(f"norm_type must be 1, 2 or inf, got {norm_type!r}")
        return
    if is_traced(norm_type) or callable(norm_type):
        return
    value = np.asarray(norm_type)
    if value.shape != () or float(value) not in _NORM_TYPES:
        raise ValueError(f"norm_type must be 1, 2 or inf, got {norm_type!r}")


def _static_norm_type(norm_type: Any) -> float | None:
    """``norm_type`` as 1.0, 2.0 or inf when known in Python, else None (traced)."""
    if isinstance(norm_type, str):
        return math.inf
    if is_traced(norm_type):
        return None
    return float(np.asarray(norm_type))


# --------------------------------------------------------------------------------------------
# Cross-device reductions
# --------------------------------------------------------------------------------------------


def _axis_names(axis_name: AxisName) -> tuple[str, ...]:
    if axis_name is None:
        return ()
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _varying_axes(x: Any) -> frozenset:
    """The manual mesh axes along which ``x`` differs between devices (``shard_map``)."""
    aval = jax.typeof(x)
    if hasattr(aval, "vma"):
        return frozenset(aval.vma)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(getattr(manual, "varying", ()))


def _sharded_axes(x: Any, axes: tuple[str, ...]) -> tuple[str, ...]:
    """The axes of ``axes`` along which ``x`` holds different values on different devices.

    Under ``shard_map`` (with its default ``check_vma=True``) JAX tracks which values vary
    across devices, so a leaf replicated along an axis is counted once. Under ``pmap`` or
    ``check_vma=False`` nothing is tracked and every leaf is taken as a shard along every axis.
    """
    tracked = [a for a in axes if a in _varying_axes(jax.lax.axis_index(a))]
    untracked = tuple(a for a in axes if a not in tracked)
    varying = _varying_axes(x)
    return tuple(a for a in tracked if a in varying) + untracked


def reduce_across_devices(
    values: Sequence[jax.Array], leaves: Sequence[jax.Array], axis_name: AxisName, op: str = "sum"
) -> jax.Array:
    """Sum (or max) per-leaf scalars over the tree and over the devices of ``axis_name``.

    ``values[i]`` is leaf ``i``'s local contribution; leaves replicated along an axis are
    reduced once, not once per device. ``op`` is ``"sum"`` or ``"max"``.
    """
    combine = jnp.sum if op == "sum" else jnp.max
    collective = jax.lax.psum if op == "sum" else jax.lax.pmax
    axes = _axis_names(axis_name)
    groups: dict[tuple[str, ...], list[jax.Array]] = {}
    for value, leaf in zip(values, leaves, strict=True):
        groups.setdefault(_sharded_axes(leaf, axes) if axes else (), []).append(value)
    totals = []
    for group_axes, group in groups.items():
        total = combine(jnp.stack(group))
        totals.append(collective(total, group_axes) if group_axes else total)
    return combine(jnp.stack(totals))


def reduce_leaf_across_devices(
    value: jax.Array, leaf: jax.Array, axis_name: AxisName, op: str = "sum"
) -> jax.Array:
    """One leaf's local reduction (any shape) completed over the devices it is sharded on."""
    axes = _sharded_axes(leaf, _axis_names(axis_name)) if axis_name is not None else ()
    if not axes:
        return value
    return (jax.lax.psum if op == "sum" else jax.lax.pmax)(value, axes)


# --------------------------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------------------------


def _leaf_power_sum(x: jax.Array, norm_type: float, axis: Any = None, keepdims=False):
    """Per-leaf local reduction: sum |x|^2 (2), sum |x| (1) or max |x| (inf)."""
    if norm_type == 2.0:
        return jnp.sum(abs_sq(x), axis=axis, keepdims=keepdims)
    magnitude = safe_sqrt(abs_sq(x)) if jnp.iscomplexobj(x) else jnp.abs(x)
    magnitude = magnitude.astype(accumulation_dtype(x.dtype))
    if norm_type == 1.0:
        return jnp.sum(magnitude, axis=axis, keepdims=keepdims)
    return jnp.max(magnitude, axis=axis, keepdims=keepdims, initial=0)  # 0 for empty leaves


def _finish(total: jax.Array, norm_type: float) -> jax.Array:
    return safe_sqrt(total) if norm_type == 2.0 else total


# Leaves of at most this many entries are reduced together (see pack_small_leaves).
PACK_MAX_SIZE = 2**14


def _explicitly_sharded(x: Any) -> bool:
    """Whether ``x``'s type names a mesh axis (sharding in types, ``AxisType.Explicit``)."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None) or ()
    return any(entry is not None for entry in spec)


def pack_small_leaves(leaves: Sequence[jax.Array], axis_name: AxisName = None) -> list[jax.Array]:
    """``leaves`` with the small ones of each dtype concatenated into one flat array.

    A tree of thousands of small leaves costs one reduction kernel per leaf (dispatch and
    compile time grow with the count); reducing their concatenation instead is one kernel, at
    the price of one extra read of the small leaves only. Leaves larger than
    ``PACK_MAX_SIZE`` stay as they are, and so do leaves sharded over a mesh with explicit
    axes (their concatenation would need one sharding). Inside ``shard_map`` only leaves
    sharded along the same axes are packed together, so :func:`reduce_across_devices` still
    counts each once. Reductions that sum or take the max over whole leaves give the same
    result on the packed list (up to the order of the floating-point additions).
    """
    axes = _axis_names(axis_name)
    kept: list[jax.Array] = []
    packs: dict[tuple[Any, ...], list[jax.Array]] = {}
    for x in leaves:
        if x.size > PACK_MAX_SIZE or _explicitly_sharded(x):
            kept.append(x)
        else:
            key = (jnp.dtype(x.dtype), _sharded_axes(x, axes) if axes else ())
            packs.setdefault(key, []).append(x)
    for group in packs.values():
        kept.append(group[0] if len(group) == 1 else jnp.concatenate([x.ravel() for x in group]))
    return kept


def _static_global_norm(tree: Any, norm_type: float, axis_name: AxisName) -> jax.Array:
    dtype = tree_accumulation_dtype(tree)
    leaves = pack_small_leaves(float_leaves(tree), axis_name)
    if not leaves:
        return jnp.zeros((), dtype)
    values = [_leaf_power_sum(x, norm_type).astype(dtype) for x in leaves]
    op = "max" if norm_type == math.inf else "sum"
    return _finish(reduce_across_devices(values, leaves, axis_name, op), norm_type)


def _dispatch_norm_type(norm_type: Any, compute: Callable[[float], Any]) -> Any:
    """Run ``compute(p)`` for a static norm type, or ``lax.switch`` over 1, 2, inf when traced."""
    static = _static_norm_type(norm_type)
    if static is not None:
        return compute(static)
    p = jnp.asarray(norm_type, jnp.float32)
    index = jnp.where(p == 1, 0, jnp.where(p == 2, 1, 2))
    return jax.lax.switch(
        index, [lambda: compute(1.0), lambda: compute(2.0), lambda: compute(math.inf)]
    )


def global_norm(tree: Any, norm_type: Any = 2, *, axis_name: AxisName = None) -> jax.Array:
    """The norm of all float leaves of ``tree`` taken together.

    .. math:: \\|g\\|_p = \\Big(\\sum_i \\sum_j |g_{ij}|^p\\Big)^{1/p}

    with :math:`p \\in \\{1, 2, \\infty\\}` (max over entries for inf).

    Accumulated in float32 (float64 for float64 leaves); finite derivative at zero. With
    ``axis_name`` (inside ``shard_map``/``pmap``) the local sums are reduced across devices.
    """
    return _dispatch_norm_type(norm_type, lambda p: _static_global_norm(tree, p, axis_name))


def leaf_norm(
    x: jax.Array,
    norm_type: Any = 2,
    *,
    axis: Any = None,
    keepdims: bool = False,
    axis_name: AxisName = None,
) -> jax.Array:
    """The norm of one float array (over ``axis``), in its accumulation dtype."""

    def compute(p: float) -> jax.Array:
        local = _leaf_power_sum(x, p, axis, keepdims)
        op = "max" if p == math.inf else "sum"
        return _finish(reduce_leaf_across_devices(local, x, axis_name, op), p)

    return _dispatch_norm_type(norm_type, compute)


# --------------------------------------------------------------------------------------------
# Scale factors
# --------------------------------------------------------------------------------------------


def clip_scale(norm: jax.Array, threshold: jax.Array) -> jax.Array:
    """The factor that brings ``norm`` down to ``threshold``: 1 if norm <= threshold, else t/n.

    A threshold met exactly gives 1; zero norm with zero threshold gives 1 (zeros stay zeros);
    a non-finite norm gives 1 (the update passes through, so a guard can see it). The
    derivative is finite everywhere, including at zero norm.
    """
    threshold = jnp.asarray(threshold, norm.dtype)
    keep = jnp.logical_or(norm <= threshold, ~jnp.isfinite(norm))
    return jnp.where(keep, jnp.ones_like(norm), threshold / jnp.where(keep, 1, norm))


# PyTorch's clip_grad_norm_ adds this to the norm before dividing (ZClip and AutoClip too).
TORCH_NORM_EPS = 1e-6


def torch_clip_scale(norm: jax.Array, threshold: jax.Array) -> jax.Array:
    """``torch.nn.utils.clip_grad_norm_``'s factor ``min(1, c / (N + 1e-6))``, always applied.

    A NaN norm gives NaN and an infinite one gives 0, as in PyTorch.
    """
    return jnp.minimum(1, jnp.asarray(threshold, norm.dtype) / (norm + TORCH_NORM_EPS))


def scale_leaf(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * scale`` with ``scale`` cast to ``x``'s dtype (the leaf keeps its dtype).

    A scalar ``scale`` of exactly 1 returns ``x`` through a select rather than a multiply: the
    same numbers (``x * 1 == x``), but with donated buffers XLA then need not rewrite the
    leaf on steps that do not clip, which halves the memory traffic of those steps.
    """
    scale = jnp.asarray(scale)
    product = x * scale.astype(x.dtype)
    return jnp.where(scale == 1, x, product) if scale.ndim == 0 else product


def scale_tree(tree: Any, scale: jax.Array) -> Any:
    """Multiply every float leaf by the scalar ``scale`` cast to its dtype (dtypes are kept)."""
    return map_float_leaves(lambda x: scale_leaf(x, scale), tree)


def tree_all_finite(tree: Any) -> jax.Array:
    """Whether every float leaf of ``tree`` is free of NaN and Inf (True for an empty tree)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in float_leaves(tree)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


# --------------------------------------------------------------------------------------------
# Counters and hyperparameters
# --------------------------------------------------------------------------------------------


def zero_count() -> jax.Array:
    """A step counter at zero (int32)."""
    return jnp.zeros([], jnp.int32)


def safe_increment(count: jax.Array) -> jax.Array:
    """``count + 1`` that saturates at the int32 maximum instead of overflowing."""
    return cast(jax.Array, optax.safe_increment(count))


def resolve(
    hyperparameter: ScalarOrSchedule, count: jax.Array, dtype: Any = jnp.float32
) -> jax.Array:
    """The value of a number, array or schedule ``step -> value`` at step ``count``.

    Schedules run under standard dtype promotion: Optax's mix int32 steps with Python floats,
    which a user's ``jax_numpy_dtype_promotion="strict"`` would otherwise reject.
    """
    if callable(hyperparameter):
        with jax.numpy_dtype_promotion("standard"):
            return jnp.asarray(hyperparameter(count), dtype)
    return jnp.asarray(hyperparameter, dtype)


def check_scalar(
    name: str,
    value: Any,
    *,
    lower: float | None = 0.0,
    lower_inclusive: bool = True,
    upper: float | None = None,
    upper_inclusive: bool = True,
    allow_schedule: bool = True,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite number in range.

    Schedules (when ``allow_schedule``) and traced values are accepted unchecked: they are only
    known at run time.
    """
    if callable(value):
        if not allow_schedule:
            raise ValueError(f"{name} must be a number, got a callable {value!r}")
        return
    if is_traced(value):
        return
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        array = np.asarray(value)
    except Exception as error:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name} must be a number, got {value!r}") from error
    if array.shape not in ((), (1,)) or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be a scalar number, got {value!r}")
    number = float(array.reshape(()))
    low = "[" if lower_inclusive else "("
    high = "]" if upper_inclusive else ")"
    bounds = f"{low}{'-inf' if lower is None else lower}, {'inf' if upper is None else upper}{high}"
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite and in {bounds}, got {value!r}")
    too_low = lower is not None and (number < lower or (not lower_inclusive and number == lower))
    too_high = upper is not None and (number > upper or (not upper_inclusive and number == upper))
    if too_low or too_high:
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")


def check_int(
    name: str,
    value: Any,
    *,
    lower: int = 0,
    upper: int | None = None,
    allow_none: bool = False,
    allow_schedule: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer in ``[lower, upper]``.

    ``None`` (when ``allow_none``), schedules (when ``allow_schedule``) and traced values are
    accepted unchecked.
    """
    if (value is None and allow_none) or (callable(value) and allow_schedule) or is_traced(value):
        return
    bounds = f"[{lower}, {'inf' if upper is None else upper}]"
    alternatives = (" or None" if allow_none else "") + (" or a schedule" if allow_schedule else "")
    message = f"{name} must be an integer in {bounds}{alternatives}, got {value!r}"
    if isinstance(value, bool) or callable(value):
        raise ValueError(message)
    array = np.asarray(value)
    if array.shape != () or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(message)
    if int(array) < lower or (upper is not None and int(array) > upper):
        raise ValueError(message)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_transform(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an Optax gradient transformation."""
    if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        raise ValueError(f"{name} must be an optax.GradientTransformation, got {value!r}")


def check_axis_name(axis_name: Any) -> None:
    """Raise ``ValueError`` unless ``axis_name`` is None, a string or a tuple of strings."""
    names = axis_name if isinstance(axis_name, (tuple, list)) else (axis_name,)
    if axis_name is not None and not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"axis_name must be None, a mesh axis name or a tuple of them, got {axis_name!r}"
        )


def require_params(params: Any) -> None:
    """Raise Optax's ``ValueError`` when a transform that needs ``params`` gets none."""
    if params is None:
        raise ValueError(NO_PARAMS_MSG)


def mean_across_devices(value: jax.Array, axis_name: AxisName) -> jax.Array:
    """``value`` averaged over the devices of ``axis_name`` along which it differs.

    A value replicated along an axis (under ``shard_map``) is returned unchanged for that axis;
    under ``pmap`` every axis is averaged over. Used for a per-device loss (extra arg ``value``)
    that every device must see the same.
    """
    if axis_name is None:
        return value
    axes = _sharded_axes(value, _axis_names(axis_name))
    return jax.lax.pmean(value, axes) if axes else value
