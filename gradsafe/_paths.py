"""Readable parameter paths: ``("encoder", "layer_0", "kernel") -> "encoder/layer_0/kernel"``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax


def _key_str(key: Any) -> str:
    for attribute in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """Join a ``jax.tree_util`` key path into ``"a/b/0/kernel"`` (the form masks match on)."""
    return "/".join(_key_str(key) for key in path)


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """``(path string, leaf)`` for every leaf of ``tree``, in ``jax.tree.leaves`` order."""
    return [(path_str(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


# --------------------------------------------------------------------------------------------
# Masks from regular expressions on paths
# --------------------------------------------------------------------------------------------


def _compile_patterns(name: str, patterns: Any) -> tuple[re.Pattern, ...] | None:
    """``patterns`` (None, one regex or a sequence of them) compiled; ValueError naming ``name``."""
    if patterns is None:
        return None
    if isinstance(patterns, (str, re.Pattern)):
        patterns = (patterns,)
    elif not isinstance(patterns, (list, tuple)):
        raise ValueError(
            f"{name} must be None, a regular expression or a list of them, got {patterns!r}"
        )
    compiled = []
    for pattern in patterns:
        if isinstance(pattern, re.Pattern):
            compiled.append(pattern)
            continue
        if not isinstance(pattern, str):
            raise ValueError(f"{name} must hold regular expressions (str), got {pattern!r}")
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(
                f"{name} holds an invalid regular expression {pattern!r}: {error}"
            ) from error
    return tuple(compiled)


class PathMask:
    """A mask function ``tree -> tree of bools`` from regular expressions on leaf paths.

    Made by :func:`path_mask`; see there. Instances compare equal when their patterns do, so
    they can be static arguments of ``jax.jit`` and ``optax.inject_hyperparams``.
    """

    def __init__(self, include: Any = None, exclude: Any = None):
        self._include = _compile_patterns("include", include)
        self._exclude = _compile_patterns("exclude", exclude)

    def selects(self, path: str) -> bool:
        """Whether the leaf at ``path`` (``"a/b/kernel"``) is selected (True in the mask)."""
        included = self._include is None or any(p.search(path) for p in self._include)
        excluded = self._exclude is not None and any(p.search(path) for p in self._exclude)
        return included and not excluded

    def __call__(self, tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda path, _: self.selects(path_str(path)), tree)

    def _key(self) -> tuple:
        def patterns(compiled):
            return None if compiled is None else tuple((p.pattern, p.flags) for p in compiled)

        return (patterns(self._include), patterns(self._exclude))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PathMask) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        include, exclude = (
            None if compiled is None else [p.pattern for p in compiled]
            for compiled in (self._include, self._exclude)
        )
        return f"path_mask(include={include!r}, exclude={exclude!r})"


def path_mask(include: Any = None, exclude: Any = None) -> PathMask:
    """A mask function selecting parameters by regular expressions on their paths.

    A leaf's path is its keys joined by ``"/"`` (``"encoder/layer_0/kernel"``, see
    :func:`path_str`). The leaf is selected (True) when its path matches one of ``include``
    (every leaf when ``include`` is None) and none of ``exclude``. Matching uses
    :func:`re.search`, so ``"bias"`` matches ``"dense/bias"``; anchor with ``^``, ``$`` or
    ``(^|/)`` for exact names.

    The result is a function ``tree -> tree of bools`` with the tree's structure (``None``
    leaves stay ``None``), usable as:

    * ``mask=`` of gradsafe's regularizers and of Optax (``optax.masked``,
      ``optax.add_decayed_weights``, ``optax.adamw``): True leaves are transformed, the others
      pass through unchanged;
    * ``exclude=`` of :func:`gradsafe.adaptive_grad_clip`: True leaves are not clipped.

    Under ``optax.inject_hyperparams`` list the argument that receives it in ``static_args``
    (Optax would otherwise call it as a schedule).

    Args:
      include: a regular expression or a list of them; None selects every leaf.
      exclude: a regular expression or a list of them; matching leaves are never selected.

    Returns:
      A :class:`PathMask`, callable on any pytree.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)},
      ...           "norm": {"scale": jnp.ones(2)}}
      >>> no_decay = gs.path_mask(exclude=[r"bias$", r"norm/scale$"])
      >>> no_decay(params)
      {'dense': {'bias': False, 'kernel': True}, 'norm': {'scale': False}}
    """
    return PathMask(include, exclude)
