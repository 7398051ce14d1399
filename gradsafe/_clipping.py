"""Fixed clippers: by value, by global norm, by leaf norm, by block RMS, and AGC.

Each factory returns an :class:`optax.GradientTransformationExtraArgs` whose state records what
it saw and did (see :mod:`gradsafe._metrics`). Thresholds may be numbers, arrays or Optax
schedules ``step -> value`` (threshold decay).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradsafe._checks import (
    check_axis,
    check_axis_name,
    check_choice,
    check_norm_type,
    check_scalar,
    require_params,
)
from gradsafe._metrics import register_stats
from gradsafe._numerics import (
    AxisName,
    ScalarOrSchedule,
    accumulation_dtype,
    clip_factor,
    float_leaves,
    global_norm,
    is_float_leaf,
    largest,
    leaf_norms_of,
    map_float_leaves,
    nonnegative,
    norm_of_norms,
    resolve,
    safe_increment,
    scale_leaf,
    scale_tree,
    torch_clip_scale,
    zero_count,
)

# Optax's unitwise_clip floor on the gradient's unit norm.
AGC_DIV_EPS = 1e-6


def _smallest(scales: list[jax.Array]) -> jax.Array:
    """The smallest of per-leaf (or per-unit) scale factors, 1 when there are none."""
    if not scales:
        return jnp.ones([], jnp.float32)
    return jnp.min(jnp.stack([jnp.min(s).astype(jnp.float32) for s in scales]))


# --------------------------------------------------------------------------------------------
# clip_by_value
# --------------------------------------------------------------------------------------------


@register_stats("clip_by_value", "threshold", "clipped", "count")
class ClipByValueState(NamedTuple):
    """State of :func:`clip_by_value`: steps seen, bound in force, and ``clipped``: whether any
    entry was beyond the bound (a NaN entry counts)."""

    count: jax.Array
    threshold: jax.Array
    clipped: jax.Array


def clip_by_value(max_delta: ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
    """Clip every gradient entry to ``[-max_delta, max_delta]``.

    .. math:: g_j \\leftarrow \\min(\\max(g_j, -\\delta), \\delta)

    NaN entries stay NaN and ``±Inf`` become ``±max_delta`` (as ``torch.nn.utils.clip_grad_value_``
    and ``optax.clip``). Complex entries are clipped on their real and imaginary parts. Integer,
    bool and ``None`` leaves pass through unchanged (Optax turns integers into floats).

    Args:
      max_delta: the bound, ``>= 0``; a number, an array or a schedule ``step -> bound``.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`ClipByValueState`.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> tx = gs.clip_by_value(1.0)
      >>> state = tx.init(jnp.zeros(3))
      >>> tx.update(jnp.array([-3.0, 0.5, 2.0]), state)[0]
      Array([-1. ,  0.5,  1. ], dtype=float32)

    References:
      Mikolov, `Statistical Language Models Based on Neural Networks
      <https://www.fit.vut.cz/study/phd-thesis-file/283/283.pdf>`_, 2012 (value clipping).
    """
    check_scalar("max_delta", max_delta)

    def init_fn(params: Any) -> ClipByValueState:
        del params
        count = zero_count()
        return ClipByValueState(count, resolve(max_delta, count), jnp.array(False))

    def components(x: jax.Array) -> tuple[jax.Array, ...]:
        return (x.real, x.imag) if jnp.iscomplexobj(x) else (x,)

    def peak(x: jax.Array) -> jax.Array:
        """The largest magnitude of any component of ``x``: NaN if it has a NaN, except on
        XLA:CPU, whose fused max skips NaN (the NaN passes through either way)."""
        peaks = [jnp.max(jnp.abs(c), initial=0) for c in components(x)]
        return jnp.max(jnp.stack(peaks).astype(accumulation_dtype(x.dtype)))

    def clip_leaf(x: jax.Array, bound: jax.Array, exceeded: jax.Array) -> jax.Array:
        low, high = -bound.astype(x.real.dtype), bound.astype(x.real.dtype)
        clipped = [jnp.clip(c, low, high) for c in components(x)]
        clipped_x = jax.lax.complex(*clipped) if jnp.iscomplexobj(x) else clipped[0]
        # Selecting on the leaf's own peak orders the reduction before the in-place write (no
        # copy of the leaf) and lets a step with nothing to clip skip the write.
        return jnp.where(exceeded, clipped_x, x)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        bound = nonnegative(resolve(max_delta, state.count))
        flags: list[jax.Array] = []

        def clip_one(x: jax.Array) -> jax.Array:
            # NaN counts as out of bounds: its leaf is clipped (the NaN itself stays NaN).
            exceeded = ~(peak(x) <= bound.astype(accumulation_dtype(x.dtype)))
            flags.append(exceeded)
            return clip_leaf(x, bound, exceeded)

        updates = map_float_leaves(clip_one, updates)
        clipped = jnp.any(jnp.stack(flags)) if flags else jnp.array(False)
        return updates, ClipByValueState(safe_increment(state.count), bound, clipped)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# clip_by_global_norm
# --------------------------------------------------------------------------------------------


@register_stats("clip_by_global_norm", "norm", "scale", "threshold", "clipped", "count")
class ClipByGlobalNormState(NamedTuple):
    """State of :func:`clip_by_global_norm`.

    Attributes:
      count: steps seen (int32, saturating).
      norm: the global norm of the incoming gradient, before clipping (float32).
      scale: the factor applied to every leaf this step.
      threshold: ``max_norm`` in force this step.
      clipped: whether the gradient was scaled down.
    """

    count: jax.Array
    norm: jax.Array
    scale: jax.Array
    threshold: jax.Array
    clipped: jax.Array


def _initial_norm_state(cls: type, threshold: ScalarOrSchedule) -> Any:
    count = zero_count()
    return cls(
        count=count,
        norm=jnp.zeros([], jnp.float32),
        scale=jnp.ones([], jnp.float32),
        threshold=resolve(threshold, count),
        clipped=jnp.array(False),
    )


def clip_by_global_norm(
    max_norm: ScalarOrSchedule,
    *,
    norm_type: int | float | str = 2,
    semantics: str = "optax",
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Scale the whole gradient down so that its global norm is at most ``max_norm``.

    With :math:`N = \\|g\\|_p` over all leaves together and :math:`c` = ``max_norm``:

    * ``semantics="optax"`` (default): :math:`s = 1` if :math:`N \\le c`, else :math:`c / N`.
      The same numbers as ``optax.clip_by_global_norm`` for finite gradients. A non-finite
      :math:`N` gives :math:`s = 1`: the gradient passes through unchanged so that a guard
      (:func:`gradsafe.skip_nonfinite`) can see and refuse it.
    * ``semantics="torch"``: :math:`s = \\min(1, c / (N + 10^{-6}))`, always applied, exactly as
      ``torch.nn.utils.clip_grad_norm_``: a norm equal to :math:`c` is scaled by
      :math:`c/(c+10^{-6})`, a NaN norm makes every entry NaN, an infinite norm makes finite
      entries 0 and infinite ones NaN, and ``max_norm=0`` zeroes everything.

    Then :math:`g \\leftarrow s\\,g`. The norm accumulates in float32 (float64 for float64 leaves
    under x64), so a float16 gradient with norm 1e4 is clipped correctly where Optax's
    float16 norm overflows to Inf and returns zeros; every leaf keeps its dtype; integer, bool,
    ``float0``, ``None`` and ``MaskedNode`` leaves pass through; zero gradients with
    ``max_norm=0`` stay zero; ``jax.grad`` through the update is finite at zero gradients.

    Inside ``shard_map``/``pmap``, pass ``axis_name`` so that the norm covers the whole model:
    local sums are reduced across that axis. Under ``shard_map`` leaves replicated along the axis
    are counted once; under ``pmap`` (which does not track replication) every leaf is taken as
    a shard, so do not pass ``axis_name`` there for gradients already averaged across devices.
    Under plain ``jit`` with sharded arrays nothing is needed: the norm is global.

    Args:
      max_norm: the largest allowed norm, ``>= 0``; a number, an array or a schedule.
      norm_type: 2 (default), 1 or ``inf``.
      semantics: ``"optax"`` or ``"torch"``, see above.
      axis_name: mesh axis name(s) to reduce over inside ``shard_map``/``pmap``.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`ClipByGlobalNormState`.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> tx = gs.clip_by_global_norm(1.0)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
      >>> updates["w"], float(state.norm), bool(state.clipped)
      (Array([0.6, 0.8], dtype=float32), 5.0, True)

    References:
      Pascanu, Mikolov and Bengio, `On the difficulty of training recurrent neural networks
      <https://arxiv.org/abs/1211.5063>`_, ICML 2013.
    """
    check_scalar("max_norm", max_norm)
    check_norm_type(norm_type)
    check_axis_name(axis_name)
    check_choice("semantics", semantics, ("optax", "torch"))

    def init_fn(params: Any) -> ClipByGlobalNormState:
        del params
        return _initial_norm_state(ClipByGlobalNormState, max_norm)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        threshold = resolve(max_norm, state.count)
        norm = global_norm(updates, norm_type, axis_name=axis_name)
        if semantics == "torch":
            scale = torch_clip_scale(norm, threshold)
        else:
            scale = clip_factor(norm, threshold)
        new_state = ClipByGlobalNormState(
            count=safe_increment(state.count),
            norm=norm.astype(jnp.float32),
            scale=scale.astype(jnp.float32),
            threshold=threshold,
            clipped=scale < 1,
        )
        return scale_tree(updates, scale), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# clip_by_leaf_norm
# --------------------------------------------------------------------------------------------


@register_stats("clip_by_leaf_norm", "norm", "scale", "threshold", "clipped", "count")
class ClipByLeafNormState(NamedTuple):
    """State of :func:`clip_by_leaf_norm`: ``norm`` is the global norm before clipping,
    ``scale`` the smallest per-leaf factor, ``clipped`` whether any leaf was scaled down."""

    count: jax.Array
    norm: jax.Array
    scale: jax.Array
    threshold: jax.Array
    clipped: jax.Array


def clip_by_leaf_norm(
    max_norm: ScalarOrSchedule, *, axis_name: AxisName = None
) -> optax.GradientTransformationExtraArgs:
    """Clip every leaf by its own L2 norm (Keras' ``clipnorm``, TensorFlow's ``clip_by_norm``).

    For each leaf :math:`g_i` with :math:`n_i = \\|g_i\\|_2` and :math:`c` = ``max_norm``:

    .. math:: g_i \\leftarrow g_i \\cdot \\begin{cases} 1 & n_i \\le c \\\\
              c / n_i & n_i > c \\end{cases}

    A zero leaf stays zero, a leaf with a non-finite norm passes through unchanged, and a
    clipped leaf has norm ``max_norm`` (no epsilon, as in Keras). With ``axis_name``, a leaf
    sharded across devices inside ``shard_map`` is clipped by its whole norm.

    Args:
      max_norm: the largest allowed norm of each leaf, ``>= 0``; a number or a schedule.
      axis_name: mesh axis name(s) to reduce over inside ``shard_map``/``pmap``.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`ClipByLeafNormState`.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> tx = gs.clip_by_leaf_norm(1.0)
      >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
      >>> tx.update(grads, tx.init(grads))[0]["a"]
      Array([0.6, 0.8], dtype=float32)

    References:
      Keras ``Optimizer(clipnorm=...)``; Pascanu et al., `On the difficulty of training
      recurrent neural networks <https://arxiv.org/abs/1211.5063>`_, ICML 2013.
    """
    check_scalar("max_norm", max_norm)
    check_axis_name(axis_name)

    def init_fn(params: Any) -> ClipByLeafNormState:
        del params
        return _initial_norm_state(ClipByLeafNormState, max_norm)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        threshold = resolve(max_norm, state.count)
        norms = leaf_norms_of(float_leaves(updates), 2, axis_name=axis_name)
        factors = [clip_factor(n, threshold) for n in norms]
        remaining = iter(factors)
        updates = map_float_leaves(lambda x: scale_leaf(x, next(remaining)), updates)
        smallest = _smallest(factors)
        new_state = ClipByLeafNormState(
            count=safe_increment(state.count),
            norm=norm_of_norms(norms),
            scale=smallest,
            threshold=threshold,
            clipped=smallest < 1,
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# clip_by_block_rms
# --------------------------------------------------------------------------------------------


@register_stats("clip_by_block_rms", "norm", "scale", "threshold", "clipped", "count")
class ClipByBlockRmsState(NamedTuple):
    """State of :func:`clip_by_block_rms`: ``norm`` is the global L2 norm before clipping,
    ``scale`` the smallest per-leaf factor, ``clipped`` whether any leaf was scaled down."""

    count: jax.Array
    norm: jax.Array
    scale: jax.Array
    threshold: jax.Array
    clipped: jax.Array


def clip_by_block_rms(threshold: ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
    """Clip every leaf ("block") so that its root mean square is at most ``threshold``.

    For each leaf with :math:`r_i = \\sqrt{\\operatorname{mean}(|g_i|^2)}` and :math:`\\tau` =
    ``threshold``:

    .. math:: g_i \\leftarrow g_i / d_i,\\quad d_i = \\begin{cases} 1 & r_i \\le \\tau \\\\
              r_i / \\tau & r_i > \\tau \\end{cases}

    The same numbers as ``optax.clip_by_block_rms`` for finite leaves (Adafactor's update
    clipping), to float32 rounding: the leaf is multiplied by :math:`\tau / r_i` in float32
    (and cast back) rather than divided by :math:`r_i / \tau` in its own dtype, so float16
    leaves are clipped correctly where the divisor would overflow float16. Unlike Optax, a
    zero leaf with ``threshold=0`` stays zero (not NaN), a leaf holding NaN or Inf passes
    through unchanged, a finite leaf whose squares overflow float32 is still clipped, and
    integer leaves are not turned into floats.

    Args:
      threshold: the largest allowed RMS of each leaf, ``>= 0``; a number or a schedule.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`ClipByBlockRmsState`.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> tx = gs.clip_by_block_rms(1.0)
      >>> tx.update(jnp.array([2.0, -2.0]), tx.init(jnp.zeros(2)))[0]
      Array([ 1., -1.], dtype=float32)

    References:
      Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
      <https://arxiv.org/abs/1804.04235>`_, ICML 2018.
    """
    check_scalar("threshold", threshold)

    def init_fn(params: Any) -> ClipByBlockRmsState:
        del params
        return _initial_norm_state(ClipByBlockRmsState, threshold)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        bound = resolve(threshold, state.count)
        leaves = float_leaves(updates)
        norms = leaf_norms_of(leaves, 2)
        # rms = norm / sqrt(size), taken from the overflow-safe norm.
        factors = [
            clip_factor(n / math.sqrt(max(x.size, 1)), bound)
            for x, n in zip(leaves, norms, strict=True)
        ]
        remaining = iter(factors)
        updates = map_float_leaves(lambda x: scale_leaf(x, next(remaining)), updates)
        smallest = _smallest(factors)
        new_state = ClipByBlockRmsState(
            count=safe_increment(state.count),
            norm=norm_of_norms(norms),
            scale=smallest,
            threshold=bound,
            clipped=smallest < 1,
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# adaptive_grad_clip (AGC)
# --------------------------------------------------------------------------------------------


@register_stats("adaptive_grad_clip", "norm", "scale", "clipped", "count")
class AdaptiveGradClipState(NamedTuple):
    """State of :func:`adaptive_grad_clip`: ``norm`` is the global gradient norm before
    clipping, ``scale`` the smallest unit factor, ``clipped`` whether any unit was scaled."""

    count: jax.Array
    norm: jax.Array
    scale: jax.Array
    clipped: jax.Array


def unit_axes(shape: tuple[int, ...], axis: Any = None) -> Any:
    """The axes a unit-wise norm reduces over, by Optax's ``unitwise_norm`` rules.

    ``axis`` if given; else the whole tensor for scalars and vectors (after squeezing), axis 0
    for rank 2 and 3 (dense ``(in, out)`` and multi-head kernels), ``(0, 1, 2)`` for rank 4 (HWIO
    convolutions) and ``(0, 1, 2, 3)`` for rank 5 (DHWIO). Other ranks need ``axis``.
    """
    if axis is not None:
        return axis
    ndim = len(shape)
    if sum(d != 1 for d in shape) <= 1:
        return None
    if ndim in (2, 3):
        return 0
    if ndim in (4, 5):
        return tuple(range(ndim - 1))
    raise ValueError(f"adaptive_grad_clip needs `axis` for a leaf of shape {shape} (rank {ndim})")


def adaptive_grad_clip(
    clipping: ScalarOrSchedule = 0.01,
    *,
    eps: float = 1e-3,
    axis: Any = None,
    exclude: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Adaptive gradient clipping (AGC): clip each unit relative to its parameters' norm.

    For every unit :math:`u` (a slice of a leaf, see :func:`unit_axes`) with
    :math:`G_u = \\|g_u\\|_2`, :math:`W_u = \\max(\\|w_u\\|_2, \\epsilon)` and :math:`\\lambda`
    = ``clipping``:

    .. math:: g_u \\leftarrow g_u \\cdot \\begin{cases} 1 & G_u \\le \\lambda W_u \\\\
              \\lambda W_u / \\max(G_u, 10^{-6}) & \\text{otherwise} \\end{cases}

    Same default axes and numbers as ``optax.adaptive_grad_clip``. Differences: a unit whose
    gradient norm is non-finite passes through unchanged (Optax returns NaN), integer leaves
    are not turned into floats, leaves where ``exclude`` is True are left alone (NFNets does not
    clip the final classifier), and it works under explicit sharding of a reduced axis, where
    Optax raises ``ShardingTypeError`` (the factor is computed on the reduced shape and
    broadcast by multiplication).

    Args:
      clipping: :math:`\\lambda`, the largest allowed ratio of gradient to parameter norm.
      eps: :math:`\\epsilon`, the floor on parameter norms, so zero-initialised parameters
        still move.
      axis: the reduction axes for every leaf, overriding the rank-based defaults.
      exclude: a tree of bools like the params, or a function ``params -> tree of bools``;
        True leaves are not clipped (e.g. ``gs.path_mask(include="head")``). Under
        ``optax.inject_hyperparams`` list it in ``static_args``.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`AdaptiveGradClipState`.
      Its ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> tx = gs.adaptive_grad_clip(0.1)
      >>> params = {"w": jnp.ones((2, 2))}
      >>> grads = {"w": jnp.full((2, 2), 10.0)}
      >>> tx.update(grads, tx.init(params), params)[0]["w"]
      Array([[0.1, 0.1],
             [0.1, 0.1]], dtype=float32)

    References:
      Brock, De, Smith and Simonyan, `High-Performance Large-Scale Image Recognition Without
      Normalization <https://arxiv.org/abs/2102.06171>`_, ICML 2021.
    """
    check_scalar("clipping", clipping)
    check_scalar("eps", eps, allow_schedule=False)
    check_axis("axis", axis)

    def init_fn(params: Any) -> AdaptiveGradClipState:
        del params
        one = jnp.ones([], jnp.float32)
        return AdaptiveGradClipState(
            zero_count(), jnp.zeros([], jnp.float32), one, jnp.array(False)
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        require_params(params)
        # Both as float32 scalars: a (1,)-shaped value would broadcast a scalar leaf to (1,),
        # and an injected bfloat16 value must not meet float32 norms (strict promotion).
        ratio = resolve(clipping, state.count)
        floor = resolve(eps, state.count)
        excluded = exclude(params) if callable(exclude) else exclude
        if excluded is None:
            excluded = jax.tree.map(lambda _: False, updates)
        flat, treedef = jax.tree.flatten(updates, is_leaf=lambda x: x is None)
        weights = treedef.flatten_up_to(params)
        skips = treedef.flatten_up_to(excluded)
        grads = [g for g in flat if is_float_leaf(g)]

        def axes_of(x: jax.Array) -> Any:
            return unit_axes(x.shape, axis)

        # Unit norms of all leaves at once (one overflow check for the gradients, one for
        # the parameters).
        g_norms = iter(leaf_norms_of(grads, 2, axis=axes_of, keepdims=True))
        w_leaves = [w for g, w in zip(flat, weights, strict=True) if is_float_leaf(g)]
        w_norms = iter(leaf_norms_of(w_leaves, 2, axis=axes_of, keepdims=True))
        scales: list[jax.Array] = []
        unit_norms: list[jax.Array] = []

        def clip_leaf(g: Any, skip: Any) -> Any:
            if not is_float_leaf(g):
                return g
            g_norm, w_norm = next(g_norms), next(w_norms)
            unit_norms.append(g_norm)
            if isinstance(skip, bool) and skip:
                return g
            # In the wider of the two norms' dtypes, saturated into the gradient norm's: a
            # float64 weight norm beyond the float32 range must not become an infinite bound.
            wide = jnp.promote_types(g_norm.dtype, w_norm.dtype)
            bound = ratio.astype(wide) * jnp.maximum(w_norm.astype(wide), floor.astype(wide))
            max_norm = jnp.minimum(bound, largest(g_norm.dtype).astype(wide)).astype(g_norm.dtype)
            scale = clip_factor(g_norm, max_norm, floor=AGC_DIV_EPS)
            scale = jnp.where(jnp.asarray(skip), jnp.ones_like(scale), scale)
            scales.append(scale)
            return scale_leaf(g, scale)

        updates = treedef.unflatten(
            [clip_leaf(g, skip) for g, skip in zip(flat, skips, strict=True)]
        )
        smallest = _smallest(scales)
        new_state = AdaptiveGradClipState(
            count=safe_increment(state.count),
            norm=norm_of_norms(unit_norms),
            scale=smallest,
            clipped=smallest < 1,
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = [
    "AdaptiveGradClipState",
    "ClipByBlockRmsState",
    "ClipByGlobalNormState",
    "ClipByLeafNormState",
    "ClipByValueState",
    "adaptive_grad_clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "clip_by_value",
    "unit_axes",
]
