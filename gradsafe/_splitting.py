"""Splitting: cut a gradient into parts and treat each part differently.

* :func:`split_clip` splits each gradient into a clipped part, applied now, and the part that
  clipping removed, carried to the next step (U-Clip).
* :func:`split_magnitude` splits each tensor's gradient into its direction, kept, and its
  magnitude, replaced by a smoothed estimate (Stable-SPAM's AdaGN).
* :func:`split_by_path` splits the parameters into groups by their paths and gives each group
  its own transform.
* :func:`accumulate` splits a batch into micro-batches: it averages their gradients and runs
  the wrapped transform once per ``every_k`` micro-batches.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradsafe._checks import (
    check_axis_name,
    check_bool,
    check_int,
    check_scalar,
    check_transform,
    is_traced,
)
from gradsafe._metrics import register_stats
from gradsafe._numerics import (
    AxisName,
    ScalarOrSchedule,
    as_float32,
    clip_scale,
    compute_dtype,
    cond,
    global_norm,
    is_float_leaf,
    largest,
    leaf_norms_of,
    map_float_leaves,
    nonnegative,
    peak_magnitude,
    resolve,
    safe_increment,
    safe_ratio,
    safe_sqrt,
    scale_leaf,
    scale_tree,
    trace_once,
    tree_accumulation_dtype,
    zero_count,
)
from gradsafe._paths import path_str


def _zeros_buffer(params: Any) -> Any:
    """A zero buffer per float leaf of ``params`` (:func:`compute_dtype`: float32 or wider,
    complex stays complex); ``MaskedNode`` elsewhere.

    ``MaskedNode`` is an empty subtree, so non-float leaves cost no memory and ``jax.tree.map``
    over ``(updates, buffer)`` hands the whole ``MaskedNode`` to the function at those leaves.
    ``zeros_like`` gives each buffer its parameter's sharding (needed under an explicit mesh).
    """
    return jax.tree.map(
        lambda p: (
            jnp.zeros_like(p, compute_dtype(p.dtype)) if is_float_leaf(p) else optax.MaskedNode()
        ),
        params,
    )


class _Leaves:
    """Several results at one leaf position (an unregistered type: a leaf for ``jax.tree``)."""

    __slots__ = ("values",)

    def __init__(self, values: tuple[Any, ...]):
        self.values = values


def _unzip(tree: Any, count: int) -> tuple[Any, ...]:
    """Split a tree of :class:`_Leaves` into ``count`` trees of the same structure."""
    return tuple(jax.tree.map(lambda leaves, i=i: leaves.values[i], tree) for i in range(count))


# --------------------------------------------------------------------------------------------
# split_clip (U-Clip)
# --------------------------------------------------------------------------------------------


@register_stats("split_clip", "norm", "residual_norm", "bound", "clip_rate", "count")
class SplitClipState(NamedTuple):
    """State of :func:`split_clip`.

    Attributes:
      count: steps seen (int32, saturating).
      norm: the global norm of the incoming gradient, before the residual is added.
      residual_norm: the global norm of the residual carried to the next step.
      bound: :math:`b`, the global norm of the clipper's output at the last step where it
        clipped (0 before the first): the size the applied update is allowed to reach.
      clip_rate: :math:`\\rho`, the running share of steps on which the clipper clipped, set to
        1 by an explosion (0 without ``clip_rate_decay``).
      residual: the carried part, one buffer per float leaf (float32, or the leaf's dtype when
        wider: float64, complex64, complex128); ``MaskedNode`` for other leaves.
      clip_state: the state of the clipper.
    """

    count: jax.Array
    norm: jax.Array
    residual_norm: jax.Array
    bound: jax.Array
    clip_rate: jax.Array
    residual: Any
    clip_state: Any


_RELEASES = ("room", "always")


def _fit_scale(tree: Any, peak: jax.Array, cap: jax.Array, axis_name: AxisName) -> jax.Array:
    """The factor that brings the global norm of ``tree`` (finite entries, largest magnitude
    ``peak``) down to ``cap``, computed on ``tree / peak`` so that it is exact where the true
    norm exceeds the largest float (:func:`global_norm` saturates there). Computed in the
    accumulation dtype of ``tree`` (float64 under x64), dividing twice by ``sqrt(peak)``:
    ``1 / peak`` is subnormal for ``peak`` near the largest float."""
    dtype = tree_accumulation_dtype(tree)
    unit = jnp.where(peak > 0, peak, 1).astype(dtype)
    # divided, not multiplied by 1 / unit, which is subnormal for a peak near the largest float
    rescaled = map_float_leaves(lambda x: (x.astype(dtype) / unit).astype(x.dtype), tree)
    norm = global_norm(rescaled, axis_name=axis_name).astype(dtype)
    return clip_scale(norm, cap.astype(dtype) / unit)


def split_clip(
    clipper: optax.GradientTransformation | None = None,
    *,
    release: str = "room",
    residual_decay: ScalarOrSchedule = 1.0,
    max_residual_ratio: ScalarOrSchedule | None = 0.25,
    max_residual_norm: ScalarOrSchedule | None = None,
    clip_rate_decay: float | None = 0.98,
    explosion_ratio: ScalarOrSchedule | None = 2.0,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Clip, and carry what clipping removed to later steps that have room for it.

    Split each gradient into the part the clipper :math:`C` lets through and the part it
    removes; apply the first now and carry the second as a residual :math:`r` (U-Clip). With
    :math:`r_0 = 0`, decay :math:`\\gamma` = ``residual_decay`` and :math:`v_t = g_t + \\gamma
    r_{t-1}`:

    * ``release="room"`` (default): the clipper sees the gradient alone, :math:`c_t =
      C(g_t)`, and the residual fills only the room left under the bound :math:`b_t` (the
      global norm of :math:`C`'s output at the last step where it clipped; for
      ``clip_by_global_norm(c)`` it is :math:`c`):

      .. math::
          s_t = \\min\\Big(1, \\frac{(1 - \\rho_t)\\max(b_t - \\|c_t\\|, 0)}
          {\\|\\gamma r_{t-1}\\|}\\Big), \\qquad u_t = c_t + s_t\\,\\gamma r_{t-1}

      so :math:`\\|u_t\\| \\le \\max(\\|c_t\\|, b_t)`: the update is never larger than the
      clipper allows, a run of large gradients is clipped exactly as by :math:`C` alone, and
      the carried part comes back on quiet steps. :math:`C`'s statistics (an adaptive
      threshold) see only the true gradients. :math:`\\rho_t = \\beta \\rho_{t-1} + (1 -
      \\beta)\\,[C \\text{ clipped } g_t]` with :math:`\\beta` = ``clip_rate_decay`` (``None``:
      :math:`\\rho = 0`) holds the carried part back while the clipper acts on most steps:
      U-Clip's analysis needs a threshold above the gradients' typical norm, and a clip that
      acts on most steps (a learning rate too large for the task) means it is not; releasing
      the residual there lengthens the steps exactly where they are already too long.
    * ``release="always"``: U-Clip's rule, :math:`u_t = C(v_t)` (as published with
      ``max_residual_ratio=None, explosion_ratio=None``): the residual re-enters at every step,
      also when the gradient is already at the bound.

    A step where :math:`C` shrank the gradient it saw by more than :math:`e` =
    ``explosion_ratio`` (:math:`\\|C(x)\\| < \\|x\\| / e`) is an explosion, not a sample from
    the tail of the gradient noise that U-Clip's analysis repays: nothing of it is carried,
    the residual built on the way up is dropped (:math:`r_t = 0`) and :math:`\\rho_t` is set
    to 1 (with ``clip_rate_decay``), so the release is held back as after a run of clipped
    steps and comes back only as the clipper falls idle. Carrying an explosion's excess
    replays it: on the IRNN adding task with 18 seeds per learning rate
    (``benchmarks/results/split_clip_variants/adding_irnn_18_seeds/``) the plain clip
    diverged in 5 of 126 runs, carrying every excess in 9, and this rule in 7; at the largest
    learning rate the median final loss was 0.32, 0.98 and 0.58.

    In both, :math:`r_t = v_t - u_t` (0 after an explosion), then scaled down to the cap
    :math:`\\min(k\\,b_t, R)` with :math:`k` = ``max_residual_ratio`` and :math:`R` =
    ``max_residual_norm`` (either None: no such cap). With :math:`\\gamma = 1`, no cap and
    ``explosion_ratio=None`` nothing is lost: :math:`\\sum_{i \\le t} u_i + r_t = \\sum_{i \\le t}
    g_i`. The caps, the explosion rule and the decay drop mass on purpose: without them a long
    run of gradients above the threshold builds a residual that grows without bound (U-Clip's
    guarantee assumes the threshold is above the gradients' typical norm) and comes back as a
    long push in an old direction.
    The default cap keeps at most a quarter of a bound, chosen among the variants measured by
    ``benchmarks/split_clip_variants.py`` (a whole bound's worth, the previous default, lost
    the plain clip's largest stable learning rate on the IRNN adding task).

    Any gradsafe (or Optax) clipper can be ``clipper``: it sees :math:`g_t` (``"room"``) or
    :math:`v_t` (``"always"``) in the gradient's dtype, ``params`` and the extra args, and its
    state lives in ``clip_state``. The residual is computed from the update *after* it is cast
    back to the gradient's dtype, so float16 and bfloat16 rounding is carried as well.

    When the incoming gradient has a NaN or Inf entry it passes through unchanged, so that a
    guard (e.g. :func:`gradsafe.skip_nonfinite`) can refuse the step, and the residual and
    bound are kept as they were (the clipper's state still records the step). A finite
    gradient whose squared norm overflows float32 is clipped like any other (the residual's
    cap is computed on rescaled values). Integer, bool, ``None`` and ``MaskedNode`` leaves pass
    through and have no residual. The residual buffers are made with ``zeros_like`` of the
    parameters, so they follow their sharding.

    Memory: one float32 per parameter (float64/complex for such leaves), plus the clipper's.

    Args:
      clipper: the transform that bounds the update; default
        ``gradsafe.clip_by_global_norm(1.0, axis_name=axis_name)``.
      release: ``"room"`` or ``"always"``, see above.
      residual_decay: :math:`\\gamma \\in [0, 1]`, the weight of the old residual; a number or
        a schedule ``step -> value``. 0 is plain clipping.
      max_residual_ratio: :math:`k \\ge 0`, the largest residual norm as a multiple of the bound
        :math:`b_t`, or None for no such cap; a number or a schedule.
      max_residual_norm: :math:`R \\ge 0`, the largest global norm of the residual, or None for
        no cap; a number or a schedule.
      clip_rate_decay: :math:`\\beta \\in [0, 1)` of the running clip rate that scales the
        room (``release="room"`` only), or None to release into all the room.
      explosion_ratio: :math:`e \\ge 1`: a step the clipper shrinks by more than this factor
        drops the residual and resets the clip rate to 1 (see above); a number or a schedule,
        or None to carry every step's excess.
      axis_name: inside ``shard_map``/``pmap``, the mesh axis name(s) to reduce norms over, so
        every device takes the same decision (the default clipper gets it too; give your own
        clipper the same ``axis_name``).

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`SplitClipState`.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> tx = gs.split_clip(gs.clip_by_global_norm(1.0))
      >>> state = tx.init(jnp.zeros(1))
      >>> for g in [1.5, 0.5, 0.0, 5.0]:  # 1.5 -> 1 (0.5 removed, 0.25 kept), then 0.5 + 0.25;
      ...     u, state = tx.update(jnp.array([g]), state)  # 5 -> 1 is an explosion: none kept
      ...     print(float(u[0]), float(state.residual[0]))
      1.0 0.25
      0.75 0.0
      0.0 0.0
      1.0 0.0

    References:
      Elesedy and Hutter, `U-Clip: On-Average Unbiased Stochastic Gradient Clipping
      <https://arxiv.org/abs/2302.02971>`_, 2023.
    """
    if clipper is None:
        from gradsafe._clipping import clip_by_global_norm

        check_axis_name(axis_name)
        clipper = clip_by_global_norm(1.0, axis_name=axis_name)
    check_transform("clipper", clipper)
    if release not in _RELEASES:
        raise ValueError(f"release must be one of {_RELEASES}, got {release!r}")
    check_scalar("residual_decay", residual_decay, lower=0.0, upper=1.0)
    if max_residual_ratio is not None:
        check_scalar("max_residual_ratio", max_residual_ratio)
    if max_residual_norm is not None:
        check_scalar("max_residual_norm", max_residual_norm)
    if explosion_ratio is not None:
        check_scalar("explosion_ratio", explosion_ratio, lower=1.0)
    if clip_rate_decay is not None:
        check_scalar(
            "clip_rate_decay", clip_rate_decay, upper=1.0, upper_inclusive=False,
            allow_schedule=False,
        )  # fmt: skip
    check_axis_name(axis_name)
    inner = optax.with_extra_args_support(clipper)

    def init_fn(params: Any) -> SplitClipState:
        return SplitClipState(
            count=zero_count(),
            norm=jnp.zeros([], jnp.float32),
            residual_norm=jnp.zeros([], jnp.float32),
            bound=jnp.zeros([], jnp.float32),
            clip_rate=jnp.zeros([], jnp.float32),
            residual=_zeros_buffer(params),
            clip_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        decay = resolve(residual_decay, state.count)
        # Norms are finite for finite entries (saturated at the largest float32 for a float64
        # norm beyond its range); a NaN or Inf entry makes them NaN or Inf on every device.
        norm = as_float32(global_norm(updates, axis_name=axis_name))
        finite = jnp.isfinite(norm)

        def decayed(g: Any, r: Any) -> Any:
            return scale_leaf(r, decay) if is_float_leaf(g) else r

        carried = jax.tree.map(decayed, updates, state.residual)  # gamma * r, float32
        combined = jax.tree.map(  # v = g + gamma * r, float32
            lambda g, c: g.astype(c.dtype) + c if is_float_leaf(g) else g, updates, carried
        )
        seen = updates if release == "room" else combined
        clipped, clip_state = inner.update(seen, state.clip_state, params, **extra_args)
        out_norm = as_float32(global_norm(clipped, axis_name=axis_name))
        seen_norm = norm if release == "room" else global_norm(seen, axis_name=axis_name)
        seen_norm = as_float32(seen_norm)
        did_clip = finite & (out_norm < seen_norm)
        bound = jnp.where(did_clip, out_norm, state.bound)
        exploded = jnp.zeros([], bool)
        if explosion_ratio is not None:
            # written as "not within the ratio" so that a traced NaN ratio counts every clipped
            # step as an explosion: the method then falls back to the plain clip
            ratio = resolve(explosion_ratio, state.count)
            exploded = did_clip & ~(seen_norm <= ratio * out_norm)
        clip_rate = state.clip_rate
        if clip_rate_decay is not None:
            # traced and unchecked under inject_hyperparams: NaN or out of [0, 1] is clamped,
            # so the rate stays in [0, 1] and the hold-back never widens the room
            beta = jnp.minimum(nonnegative(resolve(clip_rate_decay, state.count)), 1.0)
            updated = beta * clip_rate + (1 - beta) * did_clip.astype(jnp.float32)
            updated = jnp.where(exploded, 1.0, updated)
            clip_rate = jnp.where(finite, updated, clip_rate)
        if release == "room":
            carried_peak = peak_magnitude(carried, axis_name)
            room = jnp.maximum(bound - out_norm, 0) * (1 - clip_rate)
            share = _fit_scale(carried, carried_peak, room, axis_name)
            clipped = jax.tree.map(
                lambda u, c: u.astype(c.dtype) + scale_leaf(c, share) if is_float_leaf(u) else u,
                clipped,
                carried,
            )
        # A gradient with a NaN/Inf passes through as it came, for a guard to refuse;
        # non-float leaves keep the incoming value whatever the clipper made of them.
        applied = map_float_leaves(
            lambda g, u: jnp.where(finite, u.astype(g.dtype), g), updates, clipped
        )

        def carry(g: Any, old: Any, v: Any, u: Any) -> Any:
            if not is_float_leaf(g):
                return old  # MaskedNode: no residual for this leaf
            kept = jnp.where(exploded, jnp.zeros_like(v), v - u.astype(v.dtype))
            return jnp.where(finite, kept, old)

        residual = jax.tree.map(carry, updates, state.residual, combined, applied)
        caps = []
        if max_residual_ratio is not None:
            caps.append(resolve(max_residual_ratio, state.count) * bound)
        if max_residual_norm is not None:
            caps.append(resolve(max_residual_norm, state.count))
        if caps:
            cap = functools.reduce(jnp.minimum, caps).astype(jnp.float32)
            residual_peak = peak_magnitude(residual, axis_name)
            residual = scale_tree(residual, _fit_scale(residual, residual_peak, cap, axis_name))
        residual_norm = as_float32(global_norm(residual, axis_name=axis_name))
        new_state = SplitClipState(
            count=safe_increment(state.count),
            norm=norm,
            residual_norm=residual_norm,
            bound=bound,
            clip_rate=clip_rate,
            residual=residual,
            clip_state=clip_state,
        )
        return applied, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# split_magnitude (Stable-SPAM AdaGN)
# --------------------------------------------------------------------------------------------


def _ema_constants(gamma: Any) -> tuple[jax.Array, jax.Array]:
    """``1 - gamma`` and ``log(gamma)`` in float32, from float64 when ``gamma`` is a number.

    ``1 - gamma^k`` is then ``-expm1(k log gamma)``: exact where float32 would round
    ``gamma = 0.99999`` and lose three digits of ``1 - gamma``.
    """
    if is_traced(gamma) or not isinstance(gamma, (int, float)):
        value = jnp.asarray(gamma, jnp.float32).reshape(())  # a (1,) value is a scalar
        return 1 - value, jnp.log(value)
    log = math.log(gamma) if gamma > 0 else -math.inf
    return jnp.asarray(1 - gamma, jnp.float32), jnp.asarray(log, jnp.float32)


@register_stats("split_magnitude", "norm", "scale", "count")
class SplitMagnitudeState(NamedTuple):
    """State of :func:`split_magnitude`.

    Attributes:
      count: steps seen (int32, saturating).
      norm: the global norm of the incoming gradient.
      scale: the global norm after divided by the global norm before (1 for a zero or
        non-finite gradient).
      mu: per tensor, the EMA :math:`a` of its norm (float32 scalar; ``MaskedNode`` for
        non-float leaves).
      nu: per tensor, :math:`\\sqrt{b}`, the square root of the EMA of its squared norm (kept
        as a root so that it cannot overflow float32, see :func:`split_magnitude`).
      ema_count: per tensor, how many times its EMAs were updated (int32): the exponent of
        its bias correction.
    """

    count: jax.Array
    norm: jax.Array
    scale: jax.Array
    mu: Any
    nu: Any
    ema_count: Any


def _rescale(g: jax.Array, n: jax.Array, target: jax.Array, ok: jax.Array) -> jax.Array:
    """``g / n * target`` where ``ok`` (else ``g``), in :func:`compute_dtype`, cast back.

    ``g / n`` is taken first, dividing twice by ``sqrt(n)`` (with a barrier between): the
    factor ``target / n`` would be subnormal (flushed to zero) for a norm near the largest
    float, although the result is a unit-sized tensor.
    """
    dtype = compute_dtype(g.dtype)
    real = jnp.finfo(dtype).dtype
    root = jnp.sqrt(jnp.where(ok, n, 1).astype(real))
    direction = jax.lax.optimization_barrier(g.astype(dtype) / root) / root
    return jnp.where(ok, (direction * target.astype(real)).astype(g.dtype), g)


def _root_ema(root: jax.Array, n: jax.Array, rate: jax.Array) -> jax.Array:
    """``sqrt(root^2 + rate * (n^2 - root^2))`` for ``root, n >= 0`` without forming a square.

    Computed as ``m * sqrt((1 - rate) (root/m)^2 + rate (n/m)^2)``, ``m = max(root, n)``: it
    cannot exceed ``m``. Divided twice by ``sqrt(m)`` (with a barrier between), since ``1 / m``
    is subnormal (flushed to zero) for ``m`` above 8.5e37 in float32.
    """
    m = jnp.maximum(root, n)
    unit = jnp.sqrt(jnp.where(m > 0, m, 1))

    def rescaled(x: jax.Array) -> jax.Array:
        return jax.lax.optimization_barrier(x / unit) / unit

    mean = (1 - rate) * jnp.square(rescaled(root)) + rate * jnp.square(rescaled(n))
    return m * safe_sqrt(mean)


def split_magnitude(
    gamma1: float = 0.7,
    gamma2: float = 0.9,
    *,
    eps: float = 1e-8,
    shared_count: bool = False,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Keep each tensor's gradient direction; replace its norm by a smoothed estimate (AdaGN).

    For every float leaf :math:`g` with norm :math:`n = \\|g\\|_2 > 0` (finite), its EMAs
    and their own counter :math:`k` are advanced:

    .. math::
        a \\leftarrow \\gamma_1 a + (1-\\gamma_1)\\, n,\\qquad
        b \\leftarrow \\gamma_2 b + (1-\\gamma_2)\\, n^2,\\qquad k \\leftarrow k + 1

    .. math::
        \\hat a = \\frac{a}{1-\\gamma_1^{k}},\\qquad \\hat b = \\frac{b}{1-\\gamma_2^{k}},\\qquad
        g \\leftarrow \\frac{g}{n} \\cdot \\frac{\\hat a}{\\sqrt{\\hat b} + \\epsilon}

    A spike in one tensor's norm is thereby replaced by the running typical norm (each
    tensor's output norm :math:`\\hat a / (\\sqrt{\\hat b} + \\epsilon)` is about 1, below
    it when the norm varies).
    A zero gradient stays zero and leaves its EMAs alone; a tensor with a NaN or Inf norm passes
    through unchanged (so a guard can see it) and leaves its EMAs alone. The EMAs are float32
    whatever the gradient's dtype; every leaf keeps its dtype. Integer, bool, ``None`` and
    ``MaskedNode`` leaves pass through.

    Overflow: :math:`b` is stored as its square root :math:`r = \\sqrt{b}` and advanced as
    :math:`r \\leftarrow m \\sqrt{\\gamma_2 (r/m)^2 + (1-\\gamma_2)(n/m)^2}` with
    :math:`m = \\max(r, n)`: the same :math:`b` (up to rounding), but no square is ever formed,
    so a finite norm up to the largest float32 (a float64 norm beyond it saturates there) keeps
    every EMA finite and the output within the target norm.

    Place it before the optimizer: ``optax.chain(gs.split_magnitude(), optax.adam(lr))`` is the
    AdaGN part of Stable-SPAM (which also uses AdaClip and momentum resets).

    Differences from the reference:
      The reference optimizer uses one step counter for these bias corrections, Adam's and
      AdaClip's, and resets it to 1 at every momentum reset, so :math:`\\hat a, \\hat b` are
      re-inflated after each reset; it also advances it on steps where a tensor's norm is zero
      and its EMAs were not updated, so that tensor's bias correction then under-corrects.
      Here each tensor has its own counter that counts exactly the updates of its EMAs, which
      makes :math:`\\hat a, \\hat b` unbiased averages. ``shared_count=True`` uses the number of
      ``update`` calls instead (the reference's counter without momentum resets), for users
      who want its numbers. The reference's optional cosine factor on :math:`\\gamma_1`
      (``total_T``, off by default) is not included.

    Args:
      gamma1: :math:`\\gamma_1 \\in [0, 1)`, the EMA rate of the norm.
      gamma2: :math:`\\gamma_2 \\in [0, 1)`, the EMA rate of the squared norm.
      eps: :math:`\\epsilon \\ge 0`, added to :math:`\\sqrt{\\hat b}`.
      shared_count: bias-correct with the global step count instead of per-tensor counters.
      axis_name: inside ``shard_map``/``pmap``, the mesh axis name(s) over which a tensor is
        sharded, so its norm is the whole tensor's.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`SplitMagnitudeState`.
      Memory: three scalars per tensor.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> tx = gs.split_magnitude()
      >>> state = tx.init(jnp.zeros(2))
      >>> u, state = tx.update(jnp.array([3.0, 4.0]), state)   # first step: norm -> ~1
      >>> u.round(4)
      Array([0.6, 0.8], dtype=float32)
      >>> u, state = tx.update(jnp.array([300.0, 400.0]), state)   # spike: damped
      >>> round(float(jnp.linalg.norm(u)), 4)
      0.8165

    References:
      Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam
      <https://arxiv.org/abs/2502.17055>`_, 2025.
    """
    check_scalar("gamma1", gamma1, upper=1.0, upper_inclusive=False, allow_schedule=False)
    check_scalar("gamma2", gamma2, upper=1.0, upper_inclusive=False, allow_schedule=False)
    check_scalar("eps", eps, allow_schedule=False)
    check_bool("shared_count", shared_count)
    check_axis_name(axis_name)

    def scalar_per_leaf(params: Any, dtype: Any) -> Any:
        return jax.tree.map(
            lambda p: jnp.zeros([], dtype) if is_float_leaf(p) else optax.MaskedNode(), params
        )

    def init_fn(params: Any) -> SplitMagnitudeState:
        return SplitMagnitudeState(
            count=zero_count(),
            norm=jnp.zeros([], jnp.float32),
            scale=jnp.ones([], jnp.float32),
            mu=scalar_per_leaf(params, jnp.float32),
            nu=scalar_per_leaf(params, jnp.float32),
            ema_count=scalar_per_leaf(params, jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        rate1, log1 = _ema_constants(gamma1)
        rate2, log2 = _ema_constants(gamma2)
        epsilon = jnp.asarray(eps, jnp.float32).reshape(())
        global_count = safe_increment(state.count)

        grads = [g for g in jax.tree.leaves(updates) if is_float_leaf(g)]
        leaf_norms = iter(leaf_norms_of(grads, 2, axis_name=axis_name))

        def adagn(g: Any, a: Any, b: Any, k: Any) -> Any:
            if not is_float_leaf(g):
                return _Leaves((g, a, b, k))
            wide = next(leaf_norms)
            n = as_float32(wide)
            ok = jnp.logical_and(n > 0, jnp.isfinite(n))
            new_k = jnp.where(ok, safe_increment(k), k)
            new_a = jnp.where(ok, a + rate1 * (n - a), a)
            # b is kept as its root r (state.nu): r^2 + rate2 * (n^2 - r^2) computed on r / m
            # and n / m, m = max(r, n), so that no square overflows for a norm above 1.8e19.
            new_root = jnp.where(ok, _root_ema(b, n, rate2), b)
            exponent = (global_count if shared_count else new_k).astype(jnp.float32)
            # Guarded denominators: 1 - gamma^0 = 0 before a tensor's first update.
            a_hat = safe_ratio(new_a, -jnp.expm1(exponent * log1), ok)
            # sqrt(b_hat) as sqrt(b) / sqrt(1 - gamma2^k): b_hat itself may overflow.
            root_b_hat = safe_ratio(new_root, safe_sqrt(-jnp.expm1(exponent * log2)), ok)
            # Averages of norms up to the largest float32: rounding must not make them Inf.
            a_hat = jnp.minimum(a_hat, largest(jnp.float32))
            root_b_hat = jnp.minimum(root_b_hat, largest(jnp.float32))
            # The barrier keeps XLA from fusing the target into the rescale below (e.g.
            # (a / b) / n rewritten as a / (b * n), which overflows for a norm above ~1e19).
            target = jax.lax.optimization_barrier(a_hat / (root_b_hat + epsilon))
            # A rescale to the target norm, not a clip (it may grow the tensor).
            return _Leaves((_rescale(g, wide, target, ok), new_a, new_root, new_k))

        new_updates, mu, nu, ema_count = _unzip(
            jax.tree.map(adagn, updates, state.mu, state.nu, state.ema_count), 4
        )
        norm = as_float32(global_norm(updates, axis_name=axis_name))
        out_norm = as_float32(global_norm(new_updates, axis_name=axis_name))
        ok = jnp.logical_and(norm > 0, jnp.isfinite(norm))
        ratio = safe_ratio(out_norm, norm, ok)
        new_state = SplitMagnitudeState(
            count=global_count, norm=norm, scale=ratio, mu=mu, nu=nu, ema_count=ema_count
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# split_by_path
# --------------------------------------------------------------------------------------------

DEFAULT_LABEL = "default"


def _rule_pairs(rules: Any) -> list[tuple[re.Pattern, optax.GradientTransformation]]:
    """``rules`` as a list of (compiled regex, transform), validated, in order."""
    if isinstance(rules, Mapping):
        items = list(rules.items())
    elif isinstance(rules, Sequence) and not isinstance(rules, (str, bytes)):
        items = list(rules)
        if not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
            raise ValueError(
                "rules must be a mapping {regex: transform} or a sequence of (regex, transform)"
                f" pairs, got {rules!r}"
            )
    else:
        raise ValueError(f"rules must be a mapping {{regex: transform}}, got {rules!r}")
    pairs = []
    for pattern, transform in items:
        if not isinstance(pattern, str):
            raise ValueError(f"rules keys must be regular expressions (str), got {pattern!r}")
        try:
            compiled = re.compile(pattern)
        except re.error as error:
            raise ValueError(
                f"rules has an invalid regular expression {pattern!r}: {error}"
            ) from None
        check_transform(f"rules[{pattern!r}]", transform)
        pairs.append((compiled, transform))
    return pairs


def split_by_path(
    rules: Mapping[str, optax.GradientTransformation]
    | Sequence[tuple[str, optax.GradientTransformation]],
    *,
    default: optax.GradientTransformation | str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Give each group of parameters, chosen by regular expressions on their paths, a transform.

    A leaf's path joins its keys with ``"/"`` (``{"encoder": {"layer_0": {"kernel": w}}}`` gives
    ``"encoder/layer_0/kernel"``; list and tuple positions are numbers, dataclass fields their
    names). Each leaf goes to the transform of the **first** rule whose regex matches somewhere
    in its path (:func:`re.search`; anchor with ``^``/``$`` for whole paths). Unmatched leaves go
    to ``default``: unchanged when it is None, that transform when it is one, and when it is
    ``"error"`` ``init``/``update`` raise a ``ValueError`` listing every unmatched path.

    It is :func:`optax.partition` with a label function, so each transform sees only its group:
    ``split_by_path({"bias|scale": gs.clip_by_global_norm(10.0)},
    default=gs.clip_by_global_norm(1.0))`` clips biases and norm scales by their own global
    norm and the rest by theirs. Extra args reach every transform, and
    :func:`gradsafe.metrics` finds their states (a transform used in two groups appears as
    ``name`` and ``name_1``).

    Args:
      rules: ``{regex: transform}`` (tried in insertion order) or a sequence of
        ``(regex, transform)`` pairs.
      default: the transform for unmatched leaves, None (identity) or ``"error"``.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` whose state is an
      :class:`optax.PartitionState` keyed ``"rule_0"``, ``"rule_1"``, ... and ``"default"``.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> tx = gs.split_by_path({"bias$": gs.clip_by_value(0.1)})
      >>> grads = {"dense": {"bias": jnp.array([1.0]), "kernel": jnp.array([1.0])}}
      >>> tx.update(grads, tx.init(grads))[0]
      {'dense': {'bias': Array([0.1], dtype=float32), 'kernel': Array([1.], dtype=float32)}}

    References:
      Optax, :func:`optax.partition` (``multi_transform``).
    """
    pairs = _rule_pairs(rules)
    transforms: dict[Hashable, optax.GradientTransformation] = {
        f"rule_{index}": transform for index, (_, transform) in enumerate(pairs)
    }
    if isinstance(default, str):
        if default != "error":
            raise ValueError(f"default must be None, a transform or 'error', got {default!r}")
    elif default is None:
        transforms[DEFAULT_LABEL] = optax.identity()
    else:
        check_transform("default", default)
        transforms[DEFAULT_LABEL] = default

    def labels(tree: Any) -> Any:
        unmatched: list[str] = []

        def label(key_path: Any, _: Any) -> str:
            path = path_str(key_path)
            for index, (pattern, _transform) in enumerate(pairs):
                if pattern.search(path):
                    return f"rule_{index}"
            unmatched.append(path)
            return DEFAULT_LABEL

        result = jax.tree_util.tree_map_with_path(label, tree)
        if default == "error" and unmatched:
            raise ValueError(
                "split_by_path: no rule matches these parameter paths (default='error'): "
                + ", ".join(repr(p) for p in unmatched)
            )
        return result

    return optax.partition(transforms, labels)


# --------------------------------------------------------------------------------------------
# accumulate
# --------------------------------------------------------------------------------------------


@register_stats("accumulate", "mini_step", "gradient_step")
class AccumulateState(NamedTuple):
    """State of :func:`accumulate`.

    Attributes:
      mini_step: micro-batches accumulated since the last inner step (int32).
      gradient_step: inner steps taken (int32, saturating).
      inner_state: the state of the wrapped transform (advanced only on inner steps).
      acc: the running mean of the micro-batch gradients (float32 per parameter, or the leaf's
        dtype when wider); ``MaskedNode`` for non-float leaves.
      clip_state: the state of ``clip_each`` (``optax.EmptyState()`` when None).
    """

    mini_step: jax.Array
    gradient_step: jax.Array
    inner_state: Any
    acc: Any
    clip_state: Any


def _keep_non_float(zero: Any, incoming: Any) -> Any:
    """``incoming`` where it is a non-float leaf of ``zero``'s shape and dtype, else ``zero``."""
    same = jnp.shape(incoming) == zero.shape and jnp.result_type(incoming) == zero.dtype
    return incoming if same and not is_float_leaf(incoming) else zero


def accumulate(
    inner: optax.GradientTransformation,
    every_k: int | Callable[[jax.Array], Any],
    *,
    clip_each: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Average ``every_k`` micro-batch gradients, then run ``inner`` once on the mean.

    Call ``update`` once per micro-batch. Each gradient :math:`g_j` (first passed through
    ``clip_each`` when given: per-micro-batch clipping) enters a running mean
    :math:`\\bar g \\leftarrow \\bar g + (g_j - \\bar g)/j`, accumulated in float32. On the
    ``every_k``-th call ``inner`` runs on :math:`\\bar g` (cast to the gradient's dtype), with
    ``params`` and the extra args of that call, and its updates are returned; on the other
    calls the updates are zeros and ``inner``'s state does not move. So
    ``accumulate(optax.chain(gs.clip_by_global_norm(1.0), optax.adam(lr)), 4)`` clips the
    mean of four micro-batches, while ``clip_each=gs.clip_by_global_norm(1.0)`` clips each of
    them before averaging (the two are not equivalent).

    The same numbers as ``optax.MultiSteps(inner, every_k)`` (its running mean and counters).
    Differences from the reference (``optax.MultiSteps``):

    * ``inner`` runs under :func:`jax.lax.cond` only on the ``every_k``-th call, where
      ``MultiSteps`` runs it on every micro-step and discards the result: the inner
      optimizer's cost is paid once per step, not ``every_k`` times.
    * It is a :class:`optax.GradientTransformationExtraArgs`, so inside ``optax.chain`` the
      extra args (e.g. ``value`` for ``optax.polyak_sgd``) reach ``inner``, where
      ``MultiSteps.gradient_transformation()`` is a plain transform and drops them.
    * The mean is reset with a select, so a NaN micro-batch does not poison later steps
      (``MultiSteps`` multiplies by 0, and ``0 * NaN`` is NaN); the step whose mean has the
      NaN still passes it to ``inner``, so put a guard inside to refuse it.
    * Integer, bool, ``float0`` and ``None`` leaves pass through on every call, from the
      latest micro-batch (``MultiSteps`` casts them to float32 to average them).

    Memory: one float32 per parameter for the mean, plus ``inner``'s and ``clip_each``'s.

    Args:
      inner: the transform (usually the optimizer) to run on the mean.
      every_k: micro-batches per step, an int ``>= 1``, or a function ``gradient_step -> k``
        (as ``MultiSteps``' ``every_k_schedule``; the batch size may change over training).
      clip_each: a transform applied to each micro-batch gradient before it is accumulated.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`AccumulateState`.

    Example:
      >>> import jax.numpy as jnp, optax, gradsafe as gs
      >>> tx = gs.accumulate(optax.sgd(1.0), every_k=2)
      >>> state = tx.init(jnp.zeros(2))
      >>> u, state = tx.update(jnp.array([1.0, 2.0]), state)
      >>> u
      Array([0., 0.], dtype=float32)
      >>> u, state = tx.update(jnp.array([3.0, 4.0]), state)
      >>> u
      Array([-2., -3.], dtype=float32)

    References:
      Optax, :class:`optax.MultiSteps`; Hermans et al., `Accumulated Gradient Normalization
      <https://arxiv.org/abs/1710.02368>`_, ACML 2017.
    """
    check_transform("inner", inner)
    if clip_each is not None:
        check_transform("clip_each", clip_each)
    check_int("every_k", every_k, lower=1, allow_schedule=True)
    inner_tx = optax.with_extra_args_support(inner)
    clip_tx = None if clip_each is None else optax.with_extra_args_support(clip_each)

    def init_fn(params: Any) -> AccumulateState:
        return AccumulateState(
            mini_step=zero_count(),
            gradient_step=zero_count(),
            inner_state=inner_tx.init(params),
            acc=_zeros_buffer(params),
            clip_state=optax.EmptyState() if clip_tx is None else clip_tx.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        k = every_k(state.gradient_step) if callable(every_k) else every_k
        k = jnp.asarray(k, jnp.int32)
        clip_state = state.clip_state
        if clip_tx is not None:
            updates, clip_state = clip_tx.update(updates, clip_state, params, **extra_args)
        count = (state.mini_step + 1).astype(jnp.float32)

        def add(g: Any, mean: Any) -> Any:
            if not is_float_leaf(g):
                return mean
            return mean + (g.astype(mean.dtype) - mean) / count.astype(mean.dtype)

        acc = jax.tree.map(add, updates, state.acc)
        mean = jax.tree.map(lambda g, m: m.astype(g.dtype) if is_float_leaf(g) else g, updates, acc)
        emit = state.mini_step == k - 1

        def inner_update() -> Any:
            return inner_tx.update(mean, state.inner_state, params, **extra_args)

        inner_update, shapes = trace_once(inner_update, emit)

        def step() -> Any:
            new_updates, new_state = inner_update()
            # Keep the state's dtypes (and weak types) fixed so both branches agree.
            new_state = jax.tree.map(
                lambda new, old: jax.lax.convert_element_type(new, jnp.result_type(old)),
                new_state,
                state.inner_state,
            )
            return new_updates, new_state

        def wait() -> Any:
            zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes()[0])
            if jax.tree.structure(zeros) == jax.tree.structure(mean):
                # Integer, bool and float0 leaves pass through, as on the emitting calls.
                zeros = jax.tree.map(_keep_non_float, zeros, mean)
            return zeros, state.inner_state

        new_updates, inner_state = cond(emit, step, wait)
        acc = jax.tree.map(lambda a: jnp.where(emit, jnp.zeros_like(a), a), acc)
        new_state = AccumulateState(
            mini_step=safe_increment(state.mini_step) % k,
            gradient_step=jnp.where(emit, safe_increment(state.gradient_step), state.gradient_step),
            inner_state=inner_state,
            acc=acc,
            clip_state=clip_state,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = [
    "AccumulateState",
    "SplitClipState",
    "SplitMagnitudeState",
    "accumulate",
    "split_by_path",
    "split_clip",
    "split_magnitude",
]
