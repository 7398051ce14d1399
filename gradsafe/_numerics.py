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

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Argument checks live in gradsafe._checks; these names stay importable from here.
from gradsafe._checks import (
    NO_PARAMS_MSG,  # noqa: F401
    check_axis,  # noqa: F401
    check_axis_name,  # noqa: F401
    check_bool,  # noqa: F401
    check_choice,  # noqa: F401
    check_int,  # noqa: F401
    check_norm_type,
    check_scalar,  # noqa: F401
    check_transform,  # noqa: F401
    is_traced,
    require_params,  # noqa: F401
)

try:  # the tracer of values that jit stages out (see trace_once)
    from jax.interpreters.partial_eval import DynamicJaxprTracer as _StagingTracer
except ImportError:  # pragma: no cover - a JAX without the name: trace_once traces twice
    _StagingTracer = ()  # type: ignore[assignment,misc]

AxisName = str | tuple[str, ...] | None
Schedule = Callable[[jax.Array], jax.typing.ArrayLike]
ScalarOrSchedule = float | jax.typing.ArrayLike | Schedule

# --------------------------------------------------------------------------------------------
# Leaf rules and dtypes
# --------------------------------------------------------------------------------------------


def is_float_leaf(x: Any) -> bool:
    """Whether ``x`` is an array that gradsafe transforms (real floating or complex dtype).

    Raises:
      ValueError: for a Python ``float`` or ``complex`` leaf. Such a leaf has no dtype, so it
        could be neither clipped in place nor counted consistently; convert the tree with
        ``jax.tree.map(jnp.asarray, tree)``. (Python ``int`` and ``bool`` leaves pass through,
        like integer arrays.)
    """
    if isinstance(x, (float, complex)) and not isinstance(x, np.generic):
        raise ValueError(
            f"gradsafe transforms arrays, got a Python {type(x).__name__} leaf {x!r}; convert"
            " the tree first, e.g. jax.tree.map(jnp.asarray, tree)"
        )
    dtype = getattr(x, "dtype", None)
    if dtype is None or dtype == jax.dtypes.float0:
        return False
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def compute_dtype(*dtypes: Any) -> jnp.dtype:
    """The dtype gradsafe computes in for leaves of ``dtypes``: the one rule for all modules.

    float32, or float64 when any input is float64/complex128 (only under x64); complex64 /
    complex128 when any input is complex. float16 and bfloat16 are widened to float32, so
    sums, products and scale factors never round or overflow in a half-precision format.
    Per-parameter buffers are kept in this dtype; results are cast back to each leaf's dtype.
    """
    wide = any(jnp.dtype(d) in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128)) for d in dtypes)
    if any(jnp.issubdtype(d, jnp.complexfloating) for d in dtypes):
        return jnp.dtype(jnp.complex128 if wide else jnp.complex64)
    return jnp.dtype(jnp.float64 if wide else jnp.float32)


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """The real part of :func:`compute_dtype`: float64 for 64-bit leaves, float32 otherwise."""
    wide = compute_dtype(dtype) in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128))
    return jnp.dtype(jnp.float64 if wide else jnp.float32)


def largest(dtype: Any) -> jax.Array:
    """The largest finite value of the real ``dtype``, as a scalar of that dtype."""
    return jnp.asarray(jnp.finfo(dtype).max, dtype)


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


def _static_norm_type(norm_type: Any) -> float | None:
    """``norm_type`` as 1.0, 2.0 or inf when known in Python (checked), else None (traced)."""
    if is_traced(norm_type):
        return None
    check_norm_type(norm_type)
    if isinstance(norm_type, str):
        return math.inf
    return float(np.asarray(norm_type).reshape(()).astype(np.float64))


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


def _collective(x: jax.Array, axes: tuple[str, ...], op: str) -> jax.Array:
    """``psum`` or ``pmax`` over ``axes``; the max is NaN when any device holds a NaN.

    XLA's cross-device max drops NaN (it keeps the other operand), so a NaN on one shard would
    vanish where ``jnp.max`` on one device keeps it: a count of NaNs is summed alongside.
    """
    if op == "sum":
        return jax.lax.psum(x, axes)
    nans = jax.lax.psum(jnp.isnan(x).astype(jnp.int32), axes)
    return jnp.where(nans > 0, jnp.asarray(jnp.nan, x.dtype), jax.lax.pmax(x, axes))


def reduce_across_devices(
    values: Sequence[jax.Array], leaves: Sequence[jax.Array], axis_name: AxisName, op: str = "sum"
) -> jax.Array:
    """Sum (or max) per-leaf scalars over the tree and over the devices of ``axis_name``.

    ``values[i]`` is leaf ``i``'s local contribution; leaves replicated along an axis are
    reduced once, not once per device. ``op`` is ``"sum"`` or ``"max"`` (NaN-propagating on
    every device, as on one).
    """
    combine = jnp.sum if op == "sum" else jnp.max
    axes = _axis_names(axis_name)
    groups: dict[tuple[str, ...], list[jax.Array]] = {}
    for value, leaf in zip(values, leaves, strict=True):
        groups.setdefault(_sharded_axes(leaf, axes) if axes else (), []).append(value)
    totals = []
    for group_axes, group in groups.items():
        total = combine(jnp.stack(group))
        totals.append(_collective(total, group_axes, op) if group_axes else total)
    return combine(jnp.stack(totals))


def reduce_leaf_across_devices(
    value: jax.Array, leaf: jax.Array, axis_name: AxisName, op: str = "sum"
) -> jax.Array:
    """One leaf's local reduction (any shape) completed over the devices it is sharded on."""
    axes = _sharded_axes(leaf, _axis_names(axis_name)) if axis_name is not None else ()
    if not axes:
        return value
    return _collective(value, axes, op)


def cond(pred: jax.Array, true_fn: Callable[..., Any], false_fn: Callable[..., Any], *args):
    """``jax.lax.cond(pred, true_fn, false_fn, *args)``, or, when ``pred`` is a concrete value
    (eager calls), only the branch it picks: ``lax.cond`` compiles both branches on every
    eager call, which made an eager update 10-100x slower than its jitted twin."""
    if is_traced(pred):
        return jax.lax.cond(pred, true_fn, false_fn, *args)
    taken = true_fn(*args) if bool(pred) else false_fn(*args)
    return jax.tree.map(jnp.asarray, taken)  # arrays, as lax.cond returns


def trace_once(fn: Callable[[], Any], value: Any) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """``fn`` (no arguments) and a function giving the shapes of its result, for a
    ``lax.cond`` branch that calls ``fn`` and a branch that needs only its shapes.

    When ``value`` (any array of the computation) is being staged out by ``jit``, ``fn`` is
    wrapped in ``jax.jit``: the shapes and the branch then share one trace of ``fn`` (jit
    caches it), not two; the trace of an optimizer's update is most of the time to compile a
    step on a tree of many leaves. Otherwise (eager, or under ``vmap``/``grad`` without
    ``jit``, where a fresh ``jax.jit`` would compile on every call) ``fn`` is returned as is.
    The shapes are computed on first use, so an eager step that does not need them (the
    branch taken runs ``fn``) does not trace ``fn`` for them.
    """
    if isinstance(value, _StagingTracer):
        fn = jax.jit(fn)
    return fn, functools.cache(lambda: jax.eval_shape(fn))


# --------------------------------------------------------------------------------------------
# Norms
#
# Fail closed on overflow: a float32 sum of squares overflows once the norm passes ~1.8e19,
# although every entry may be finite, and underflows below ~1e-19. The cheap sum is taken
# first; only when it is not trustworthy (rare) a ``lax.cond`` branch recomputes it from the
# entries multiplied by a power of two, 2**-64 or 2**64 in float32 (2**-512, 2**512 in
# float64): exact scalings that bring any finite input's sum into range. So a norm is NaN or
# Inf exactly when the input holds a NaN or Inf, and a finite input whose true norm exceeds the
# largest float32 (entries near 3.4e38) reports that largest float32. Every clipper can then
# keep its rule "non-finite norm: pass the input through for a guard".
# --------------------------------------------------------------------------------------------


def magnitude(x: jax.Array) -> jax.Array:
    """``|x|`` element-wise in the accumulation dtype (the modulus for complex entries)."""
    acc = accumulation_dtype(x.dtype)
    if jnp.iscomplexobj(x):
        return jnp.hypot(x.real.astype(acc), x.imag.astype(acc))
    return jnp.abs(x.astype(acc))


def _leaf_peak(x: jax.Array, axis: Any = None, keepdims=False) -> jax.Array:
    """max |x| (0 for empty leaves), for scaling: on XLA:CPU (jax 0.10) a large array's fused
    max reduction skips NaN entries, so use it only where NaN is caught otherwise."""
    return jnp.max(magnitude(x), axis=axis, keepdims=keepdims, initial=0)


def _leaf_power_sum(x: jax.Array, norm_type: float, axis: Any = None, keepdims=False):
    """Per-leaf local reduction: sum |x|^2 (2), sum |x| (1) or max |x| (inf)."""
    if norm_type == 2.0:
        return jnp.sum(abs_sq(x), axis=axis, keepdims=keepdims)
    size = magnitude(x)
    if norm_type == 1.0:
        return jnp.sum(size, axis=axis, keepdims=keepdims)
    # NaN on every backend when an entry is NaN or Inf (see _leaf_peak), for a second pass
    return _leaf_peak(x, axis, keepdims) + _nonfinite_flag(x, axis, keepdims)


def _finish(total: jax.Array, norm_type: float) -> jax.Array:
    return safe_sqrt(total) if norm_type == 2.0 else total


def _scaled_power_sum(
    x: jax.Array, scale: float, norm_type: float, axis: Any = None, keepdims=False
):
    """``sum |scale * x|^p`` (p = 1, 2) in the accumulation dtype. ``scale`` is a power of two,
    so the scaling is exact unless it under- or overflows; a constant rather than a scalar
    computed at run time, which XLA:CPU broadcasts into a leaf-sized temporary buffer."""
    y = x.astype(compute_dtype(x.dtype)) * scale
    axes = range(x.ndim) if axis is None else np.atleast_1d(axis)
    if math.prod(x.shape[a] for a in axes) <= 1:
        # No reduction left to fuse into: XLA folds the scale into the square (x**2 * 2**-128,
        # which overflows and flushes to NaN) unless the scaled values are kept apart.
        y = jax.lax.optimization_barrier(y)
    power = abs_sq(y) if norm_type == 2.0 else magnitude(y)
    return jnp.sum(power, axis=axis, keepdims=keepdims)


def _rescaled(norm: jax.Array, sum_at: Callable[[float], jax.Array], flag: jax.Array, p: float):
    """The norm recomputed from ``sum_at(scale)`` (the summed ``|scale * x|^p``) when the cheap
    ``norm`` is not trustworthy: with ``2**-h`` when it overflowed (saturated at the largest
    float if even the true norm exceeds it), with ``2**h`` when it underflowed; ``norm`` itself
    where the input holds a NaN or Inf (``flag``, from :func:`_nonfinite_flag`, is then NaN)."""
    half = jnp.finfo(norm.dtype).maxexp // 2
    down, up = 2.0**-half, 2.0**half
    big = jnp.minimum(_finish(sum_at(down).astype(norm.dtype), p) * up, largest(norm.dtype))
    small = _finish(sum_at(up).astype(norm.dtype), p) * down
    picked = jnp.where(jnp.isfinite(norm), small, big)
    return jnp.where(_trusted(norm) | ~jnp.isfinite(flag), norm, picked)


def _nonfinite_flag(x: jax.Array, axis: Any = None, keepdims=False) -> jax.Array:
    """``sum |x| - |x|``: NaN exactly when ``x`` has a NaN or Inf entry, else 0 (no constant
    operand: XLA:CPU writes a constant shared by several reductions to memory)."""
    size = magnitude(x)
    return jnp.sum(size - size, axis=axis, keepdims=keepdims)


def _smallest_trusted(dtype: Any) -> float:
    """The smallest norm a plain sum of squares in ``dtype`` gives to within rounding: below
    it, squares that underflowed (entries below ~1e-19 in float32) may be missing."""
    finfo = jnp.finfo(dtype)
    return math.sqrt(float(finfo.tiny)) / float(finfo.eps)


def _trusted(norm: jax.Array) -> jax.Array:
    """Element-wise, whether a cheaply computed norm needs no rescaling: finite, and 0 (see
    :func:`clip_factor`) or at least :func:`_smallest_trusted`."""
    small = _smallest_trusted(norm.dtype)
    return jnp.isfinite(norm) & ((norm == 0) | (norm >= small))


def _trustworthy(norm: jax.Array) -> jax.Array:
    """Whether every entry of ``norm`` is :func:`_trusted`."""
    return jnp.all(_trusted(norm))


def _on_overflow(norms: list[jax.Array], recompute: Callable[[], list[jax.Array]]):
    """``norms`` if all are trustworthy, else ``recompute()`` (one ``lax.cond`` for the list).

    The rare branch runs when a sum of squares overflowed (or underflowed); the common path
    costs one scalar test.
    """
    if not norms:
        return norms
    ok = jnp.all(jnp.stack([_trustworthy(n) for n in norms]))

    def rare() -> list[jax.Array]:
        with jax.named_scope(RARE_BRANCH):  # benchmarks/step.py counts passes without it
            return recompute()

    return cond(ok, lambda: norms, rare)


# The name scope of the overflow branch in the compiled program (it runs only on overflow).
RARE_BRANCH = "gradsafe_overflow_branch"
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


def packed_tree(
    tree: Any, axis_name: AxisName
) -> tuple[list[jax.Array], Any, Callable[[list[jax.Array], str], jax.Array]]:
    """The float leaves of ``tree`` packed (:func:`pack_small_leaves`), their accumulation
    dtype, and ``reduce(values, op)``: per-packed-leaf scalars cast to that dtype, summed
    (``"sum"``) or maxed (``"max"``) over the tree and the devices of ``axis_name``."""
    dtype = tree_accumulation_dtype(tree)
    leaves = pack_small_leaves(float_leaves(tree), axis_name)

    def reduce(values: list[jax.Array], op: str) -> jax.Array:
        return reduce_across_devices([v.astype(dtype) for v in values], leaves, axis_name, op)

    return leaves, dtype, reduce


def any_nonfinite(tree: Any, axis_name: AxisName = None) -> jax.Array:
    """Whether any float leaf of ``tree`` has a NaN or Inf entry, on any device.

    One sum per packed leaf of :func:`_nonfinite_flag` (sums propagate NaN on every backend,
    and over many leaves XLA compiles float sums faster than boolean reductions).
    """
    leaves, _, reduce = packed_tree(tree, axis_name)
    if not leaves:
        return jnp.array(False)
    return ~jnp.isfinite(reduce([_nonfinite_flag(x) for x in leaves], "sum"))


def _static_global_norm(tree: Any, norm_type: float, axis_name: AxisName) -> jax.Array:
    leaves, dtype, reduce = packed_tree(tree, axis_name)
    if not leaves:
        return jnp.zeros((), dtype)

    if norm_type == math.inf:
        return reduce([_leaf_power_sum(x, math.inf) for x in leaves], "max")
    norm = _finish(reduce([_leaf_power_sum(x, norm_type) for x in leaves], "sum"), norm_type)

    def recompute() -> list[jax.Array]:
        # Traced inside the branch: the common path must not pay for the extra passes.
        def sum_at(scale: float) -> jax.Array:
            return reduce([_scaled_power_sum(x, scale, norm_type) for x in leaves], "sum")

        flag = reduce([_nonfinite_flag(x) for x in leaves], "sum")
        return [_rescaled(norm, sum_at, flag, norm_type)]

    return _on_overflow([norm], recompute)[0]


def peak_magnitude(tree: Any, axis_name: AxisName = None) -> jax.Array:
    """The largest magnitude over the float leaves of ``tree``, for scaling trees whose
    entries are finite (NaN entries may be skipped, see ``_leaf_peak``; use
    :func:`global_norm` with ``norm_type=inf`` to see them)."""
    leaves, dtype, reduce = packed_tree(tree, axis_name)
    if not leaves:
        return jnp.zeros((), dtype)
    return reduce([_leaf_peak(x) for x in leaves], "max")


def _dispatch_norm_type(norm_type: Any, compute: Callable[[float], Any]) -> Any:
    """Run ``compute(p)`` for a static norm type, or ``lax.switch`` over 1, 2, inf when traced.

    A traced norm type other than 1, 2 or inf gives NaN (a clipper then passes the update
    through unchanged, flagged non-finite, for a guard to refuse).
    """
    static = _static_norm_type(norm_type)
    if static is not None:
        return compute(static)
    p = jnp.asarray(norm_type, jnp.float32).reshape(())
    index = jnp.where(p == 1, 0, jnp.where(p == 2, 1, jnp.where(p == jnp.inf, 2, 3)))

    def invalid() -> Any:
        return jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), compute(2.0))

    return jax.lax.switch(
        index, [lambda: compute(1.0), lambda: compute(2.0), lambda: compute(math.inf), invalid]
    )


def global_norm(tree: Any, norm_type: Any = 2, *, axis_name: AxisName = None) -> jax.Array:
    """The norm of all float leaves of ``tree`` taken together.

    .. math:: \\|g\\|_p = \\Big(\\sum_i \\sum_j |g_{ij}|^p\\Big)^{1/p}

    with :math:`p \\in \\{1, 2, \\infty\\}` (max over entries for inf).

    Accumulated in float32 (float64 for float64 leaves); finite derivative at zero. A finite
    input never gets a non-finite norm: when the float32 sum overflows (or underflows), the
    norm is recomputed from the entries scaled by an exact power of two (and saturates at the
    largest float32 if even the true norm exceeds it). NaN or Inf entries give a NaN or Inf
    norm. With ``axis_name`` (inside ``shard_map``/``pmap``) the local sums are reduced across
    devices, and the inf-norm is NaN when any device holds a NaN.

    Args:
      tree: any pytree; only its float leaves count.
      norm_type: 1, 2 (default) or inf (``"inf"`` too).
      axis_name: mesh axis name(s) to reduce over inside ``shard_map``/``pmap``.

    Returns:
      A scalar in float32 (float64 for float64 leaves).

    Raises:
      ValueError: for a ``norm_type`` other than 1, 2 or inf.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> float(gs.global_norm({"a": jnp.array([3.0]), "b": jnp.array([4.0])}))
      5.0
      >>> gs.global_norm(jnp.array([3e19, 4e19]))   # float32 squares overflow
      Array(5.e+19, dtype=float32)

    References:
      Pascanu, Mikolov and Bengio, `On the difficulty of training recurrent neural networks
      <https://arxiv.org/abs/1211.5063>`_, ICML 2013.
    """
    return _dispatch_norm_type(norm_type, lambda p: _static_global_norm(tree, p, axis_name))


def leaf_norms_of(
    leaves: Sequence[jax.Array],
    norm_type: Any = 2,
    *,
    axis: Callable[[jax.Array], Any] | Any = None,
    keepdims: bool = False,
    axis_name: AxisName = None,
) -> list[jax.Array]:
    """The norm of each array in ``leaves`` (over ``axis``), in its accumulation dtype.

    ``axis`` may be a function ``leaf -> axes``. Overflow is handled as in
    :func:`global_norm`, with one ``lax.cond`` for the whole list.
    """
    leaves = list(leaves)

    def axes_of(x: jax.Array) -> Any:
        return axis(x) if callable(axis) else axis

    def compute(p: float) -> list[jax.Array]:
        op = "max" if p == math.inf else "sum"
        norms = [
            _finish(
                reduce_leaf_across_devices(
                    _leaf_power_sum(x, p, axes_of(x), keepdims), x, axis_name, op
                ),
                p,
            )
            for x in leaves
        ]
        if p == math.inf:
            return norms

        def recompute() -> list[jax.Array]:
            fixed = []
            for x, norm in zip(leaves, norms, strict=True):

                def summed(local: jax.Array, x: jax.Array = x) -> jax.Array:
                    return reduce_leaf_across_devices(local, x, axis_name, "sum")

                def sum_at(scale: float, x: jax.Array = x) -> jax.Array:
                    return summed(_scaled_power_sum(x, scale, p, axes_of(x), keepdims))

                flag = summed(_nonfinite_flag(x, axes_of(x), keepdims))
                fixed.append(_rescaled(norm, sum_at, flag, p))
            return fixed

        return _on_overflow(norms, recompute)

    return _dispatch_norm_type(norm_type, compute)


def leaf_norm(
    x: jax.Array,
    norm_type: Any = 2,
    *,
    axis: Any = None,
    keepdims: bool = False,
    axis_name: AxisName = None,
) -> jax.Array:
    """The norm of one float array (over ``axis``), in its accumulation dtype.

    Overflow-safe as :func:`global_norm`. Use :func:`leaf_norms_of` for many leaves at once.
    """
    return leaf_norms_of([x], norm_type, axis=axis, keepdims=keepdims, axis_name=axis_name)[0]


def as_float32(norm: jax.Array) -> jax.Array:
    """A norm (or any non-negative statistic) in float32, saturating instead of overflowing.

    A float64 norm of a finite gradient may exceed the largest float32 (entries near 1.8e308
    under x64); a plain cast would turn it into Inf, and a clipper would then take the finite
    gradient for a non-finite one and pass it through unclipped. Finite values above the
    float32 range become the largest float32; NaN and Inf stay NaN and Inf.
    """
    norm = jnp.asarray(norm)
    if norm.dtype == jnp.dtype(jnp.float32):
        return norm
    wide = norm.astype(accumulation_dtype(norm.dtype))
    top = largest(jnp.float32).astype(wide.dtype)
    return jnp.where(jnp.isfinite(wide), jnp.clip(wide, -top, top), wide).astype(jnp.float32)


def norm_of_norms(norms: Sequence[jax.Array]) -> jax.Array:
    """The L2 norm of all entries of ``norms`` together (the global norm from per-leaf or
    per-unit L2 norms), in float32. Overflow-safe as :func:`global_norm`: computed in the
    widest dtype of ``norms`` and saturated at the largest float32 (:func:`as_float32`), so a
    finite input never gives Inf; 0 for an empty list.
    """
    if not norms:
        return jnp.zeros([], jnp.float32)
    dtype = tree_accumulation_dtype(list(norms))
    return as_float32(leaf_norm(jnp.concatenate([jnp.ravel(n).astype(dtype) for n in norms])))


# --------------------------------------------------------------------------------------------
# Scale factors
# --------------------------------------------------------------------------------------------


def safe_ratio(numerator: jax.Array, denominator: jax.Array, where: jax.Array) -> jax.Array:
    """``numerator / denominator`` where ``where`` holds, else 1; the derivative is finite
    everywhere (the division never sees the masked-out denominators)."""
    return jnp.where(where, numerator / jnp.where(where, denominator, 1), 1)


def nonnegative(threshold: jax.Array) -> jax.Array:
    """``threshold`` with negative and NaN values replaced by 0.

    Applied to every threshold-like hyperparameter, which may be traced (and so unchecked)
    under ``optax.inject_hyperparams``: a bound of 0 zeroes an update, a negative one would
    reverse it.
    """
    return jnp.where(threshold >= 0, threshold, jnp.zeros_like(threshold))


def clip_factor(
    norm: jax.Array,
    threshold: jax.Array,
    *,
    eps: float | jax.Array = 0.0,
    floor: float = 0.0,
    always: bool = False,
    nonfinite: str = "pass",
    exact_zero: bool = False,
) -> jax.Array:
    """The one clip factor of gradsafe: the scale that brings ``norm`` down to ``threshold``.

    With :math:`N` = ``norm`` and :math:`t` = ``threshold``:

    .. math:: s = \\begin{cases} 1 & N \\le t \\\\
              t / \\max(N + \\epsilon, \\text{floor}) & N > t \\end{cases}
              \\qquad\\text{or, with } \\texttt{always}:\\ s = \\min\\big(1, t / \\max(N +
              \\epsilon, \\text{floor})\\big)

    ``always=True`` is PyTorch's ``clip_grad_norm_`` factor (also applied at :math:`N = t`).
    Rules shared by every clipper:

    * A threshold met exactly leaves the gradient unchanged (without ``always``). A zero
      norm with a threshold below ~9e-13 (float32; ~7e-139 in float64) gives 0: such a norm
      may be a sum of squares that underflowed, and zeroing keeps the bound either way (a
      truly zero input stays zero). ``exact_zero=True`` turns this off for norms that cannot
      underflow (entry magnitudes).
    * ``s`` is always in ``[0, 1]``: a threshold that is negative or NaN (possible when it is
      traced, e.g. under ``optax.inject_hyperparams``) counts as 0, so a bad hyperparameter
      zeroes the update, never reverses or amplifies it.
    * ``nonfinite="pass"``: a NaN or Inf norm gives 1 (the input passes through for a guard).
      The norms of :mod:`gradsafe._numerics` are finite for finite inputs, so only a gradient
      that itself holds NaN/Inf passes. ``nonfinite="propagate"``: PyTorch's arithmetic (NaN
      norm gives NaN, Inf norm gives 0).
    * The derivative is finite everywhere, including at zero norm.

    Args:
      norm: the norm(s), any shape.
      threshold: the bound, broadcastable to ``norm``.
      eps: added to the norm in the division (PyTorch, ZClip and AdaGC use 1e-6).
      floor: the smallest divisor (Optax's AGC uses 1e-6).
      always: apply ``min(1, ...)`` instead of clipping only above the threshold.
      nonfinite: ``"pass"`` or ``"propagate"``, see above.
      exact_zero: whether a zero ``norm`` is exact (see above).

    Returns:
      The factor, in ``norm``'s dtype.
    """
    threshold = nonnegative(jnp.asarray(threshold, norm.dtype))
    divisor = jnp.maximum(norm + jnp.asarray(eps, norm.dtype), jnp.asarray(floor, norm.dtype))
    if nonfinite == "propagate":
        return jnp.minimum(1, threshold / divisor)
    finite = jnp.isfinite(norm)
    clip = (divisor > threshold) if always else (norm > threshold)
    factor = safe_ratio(threshold, divisor, finite & clip)
    # A zero norm may hide entries whose squares underflowed (below ~1e-19 in float32); with
    # a threshold that small it cannot tell the bound is met, so the input is zeroed (which
    # leaves a truly zero gradient as it is).
    if exact_zero:
        return factor.astype(norm.dtype)
    hidden = (norm == 0) & (threshold < _smallest_trusted(norm.dtype))
    return jnp.where(hidden, 0, factor).astype(norm.dtype)


def clip_scale(norm: jax.Array, threshold: jax.Array) -> jax.Array:
    """Optax's clip factor: 1 if ``norm <= threshold``, else ``threshold / norm``
    (:func:`clip_factor` with its defaults)."""
    return clip_factor(norm, threshold)


# PyTorch's clip_grad_norm_ adds this to the norm before dividing (ZClip and AutoClip too).
TORCH_NORM_EPS = 1e-6


def torch_clip_scale(norm: jax.Array, threshold: jax.Array) -> jax.Array:
    """``torch.nn.utils.clip_grad_norm_``'s factor ``min(1, c / (N + 1e-6))``, always applied.

    A NaN norm gives NaN and an infinite one gives 0, as in PyTorch.
    """
    return clip_factor(norm, threshold, eps=TORCH_NORM_EPS, always=True, nonfinite="propagate")


def scale_leaf(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * scale`` computed in :func:`compute_dtype` and cast back (the leaf keeps its dtype).

    The multiply runs in float32 for float16/bfloat16 leaves: a factor such as 1e-8 or 1e5
    is not representable in float16, but the product is. A scalar ``scale`` of exactly 1
    returns ``x`` through a select rather than a multiply: the same numbers (``x * 1 == x``),
    but with donated buffers XLA then need not rewrite the leaf on steps that do not clip,
    which halves the memory traffic of those steps.
    """
    scale = jnp.asarray(scale)
    dtype = compute_dtype(x.dtype)
    product = (x.astype(dtype) * scale.astype(dtype)).astype(x.dtype)
    return jnp.where(scale == 1, x, product) if scale.ndim == 0 else product


def scale_tree(tree: Any, scale: jax.Array) -> Any:
    """Multiply every float leaf by the scalar ``scale`` (see :func:`scale_leaf`)."""
    return map_float_leaves(lambda x: scale_leaf(x, scale), tree)


def tree_all_finite(tree: Any) -> jax.Array:
    """Whether every float leaf of ``tree`` is free of NaN and Inf (True for an empty tree)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in float_leaves(tree)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def saturate(x: jax.Array) -> jax.Array:
    """``x`` clamped to the finite range of its dtype; NaN stays NaN.

    Running statistics fed a huge but finite norm stay finite this way (a squared deviation
    of 1e20 would otherwise be Inf in float32 and poison the variance for good).
    """
    top = largest(x.dtype)
    return jnp.clip(x, -top, top)


# --------------------------------------------------------------------------------------------
# Counters and hyperparameters
# --------------------------------------------------------------------------------------------


def zero_count() -> jax.Array:
    """A step counter at zero (int32)."""
    return jnp.zeros([], jnp.int32)


def zero_scalar() -> jax.Array:
    """A float32 zero with a buffer of its own (one call per state field): a train step that
    donates the optimizer state fails when two of its leaves share one buffer."""
    return jnp.zeros([], jnp.float32)


def safe_increment(count: jax.Array) -> jax.Array:
    """``count + 1`` that saturates at the int32 maximum instead of overflowing."""
    return cast(jax.Array, optax.safe_increment(count))


def resolve(
    hyperparameter: ScalarOrSchedule, count: jax.Array, dtype: Any = jnp.float32
) -> jax.Array:
    """The value of a number, array or schedule ``step -> value`` at step ``count``, a scalar.

    Schedules run under standard dtype promotion: Optax's mix int32 steps with Python floats,
    which a user's ``jax_numpy_dtype_promotion="strict"`` would otherwise reject.
    """
    if callable(hyperparameter):
        with jax.numpy_dtype_promotion("standard"):
            value = jnp.asarray(hyperparameter(count), dtype)
    else:
        value = jnp.asarray(hyperparameter, dtype)
    # A (1,)-shaped value is used as a scalar, so it never changes the shape of a state field
    # (which would break lax.scan and checkpoints) nor broadcasts a scalar leaf to (1,).
    if value.shape != ():
        if value.size != 1:
            raise ValueError(f"a hyperparameter must be a scalar, got shape {value.shape}")
        value = value.reshape(())
    return value


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
