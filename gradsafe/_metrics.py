"""Observability: ``metrics(opt_state)``, per-leaf norms and the stats conventions.

Each stateful gradsafe transform keeps the figures a user would log in its state, under the
shared field names ``norm`` (global norm seen, before acting), ``scale`` (factor applied),
``threshold`` (bound in force), ``clipped`` / ``skipped`` (bool) and ``count`` (steps seen),
plus its own. A state class declares which of its fields are stats with :func:`register_stats`;
:func:`metrics` finds such states anywhere inside an optimizer state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from gradsafe._checks import check_norm_type
from gradsafe._numerics import global_norm, is_float_leaf
from gradsafe._paths import leaves_with_paths

_STATS: dict[type, tuple[str, tuple[str, ...]]] = {}
_StateClass = TypeVar("_StateClass", bound=type)


def register_stats(name: str, *fields: str) -> Callable[[_StateClass], _StateClass]:
    """Class decorator: the state of transform ``name``, whose ``fields`` are scalar stats."""

    def decorate(cls: _StateClass) -> _StateClass:
        _STATS[cls] = (name, fields)
        return cls

    return decorate


def stats_fields(node: Any) -> tuple[str, ...] | None:
    """The stats fields of a registered gradsafe state, or None for anything else."""
    entry = _STATS.get(type(node))
    return None if entry is None else entry[1]


def _unwrap(value: Any) -> Any:
    """The array inside a flax ``nnx.Variable`` (``nnx.Optimizer`` state), or ``value``."""
    if hasattr(value, "get_value"):
        return value.get_value()
    return value


def _children(node: Any) -> list[Any]:
    children = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)[0]
    return [] if len(children) == 1 and children[0] is node else children


def _collect(node: Any, found: list[tuple[str, dict[str, Any]]]) -> None:
    entry = _STATS.get(type(node))
    if entry is None:
        for child in _children(node):
            _collect(child, found)
        return
    name, fields = entry
    found.append((name, {f: jnp.asarray(_unwrap(getattr(node, f))) for f in fields}))
    for field in node._fields:
        if field not in fields:
            _collect(getattr(node, field), found)


def metrics(opt_state: Any) -> dict[str, jax.Array]:
    """Every gradsafe transform's figures in ``opt_state``, as ``{"<transform>/<field>": scalar}``.

    The state may be any Optax state (``chain``, ``partition``, ``masked``,
    ``inject_hyperparams``, ``MultiSteps``, gradsafe wrappers) or a flax ``nnx.Optimizer``'s
    ``opt_state``. A transform that appears twice gets ``_1``, ``_2``... after its name, in
    tree order. Works inside ``jit``.

    Args:
      opt_state: an optimizer state.

    Returns:
      A flat dict of scalar arrays, ready for a logger.

    Example:
      >>> import jax.numpy as jnp, optax, gradsafe as gs
      >>> tx = optax.chain(gs.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
      >>> float(gs.metrics(state)["clip_by_global_norm/norm"])
      5.0
    """
    found: list[tuple[str, dict[str, Any]]] = []
    _collect(opt_state, found)
    seen: dict[str, int] = {}
    out: dict[str, jax.Array] = {}
    for name, stats in found:
        index = seen.get(name, 0)
        seen[name] = index + 1
        key = name if index == 0 else f"{name}_{index}"
        out.update({f"{key}/{field}": value for field, value in stats.items()})
    return out


def leaf_norms(tree: Any, norm_type: Any = 2) -> Any:
    """The norm of each float leaf of ``tree``, as a tree of scalars (other leaves become None).

    .. math:: n_i = \\|g_i\\|_p

    ``norm_type`` is 1, 2 or inf (``ValueError`` otherwise); the norms are overflow-safe as
    :func:`gradsafe.global_norm`.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> gs.leaf_norms({"a": jnp.array([3.0, 4.0]), "b": jnp.ones(4)})
      {'a': Array(5., dtype=float32), 'b': Array(2., dtype=float32)}
    """
    check_norm_type(norm_type)
    return jax.tree.map(lambda x: global_norm(x, norm_type) if is_float_leaf(x) else None, tree)


def largest_leaves(tree: Any, k: int = 5, norm_type: Any = 2) -> list[tuple[str, float]]:
    """The ``k`` float leaves with the largest norms, as ``(path, norm)`` pairs, largest first.

    Use it on a gradient to find the layer that exploded. Paths are ``"a/b/kernel"`` strings;
    non-finite norms rank first. ``norm_type`` is 1, 2 or inf (``ValueError`` otherwise).
    This reads values to the host: call it outside ``jit``.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> grads = {"dense": {"kernel": jnp.full((2, 2), 1e3)}, "bias": jnp.ones(2)}
      >>> gs.largest_leaves(grads, k=1)
      [('dense/kernel', 2000.0)]
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    check_norm_type(norm_type)
    named = [(path, leaf) for path, leaf in leaves_with_paths(tree) if is_float_leaf(leaf)]
    norms = jax.device_get([global_norm(leaf, norm_type) for _, leaf in named])
    pairs = [(path, float(norm)) for (path, _), norm in zip(named, norms, strict=True)]
    pairs.sort(key=lambda pair: math.inf if math.isnan(pair[1]) else pair[1], reverse=True)
    return pairs[:k]
