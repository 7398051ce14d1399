"""Adaptive clippers: thresholds set from the run's own gradient statistics.

* :func:`zclip` -- z-score test against an EMA of the global norm (ZClip).
* :func:`autoclip` -- clip to a percentile of the norm history (AutoClip), exact over a
  window or streaming over the whole history with the P² estimator.
* :func:`adagc` -- per-tensor (or global) clipping relative to an EMA of clipped norms (AdaGC).
* :func:`spike_clip` -- SPAM's element-wise spike clipping against an EMA of ``g²``.

Every state is a NamedTuple of fixed-shape arrays, the updates are branch-free (``jnp.where``,
no host syncs), and the figures a user logs are stats for :func:`gradsafe.metrics`. Thresholds
derived from the statistics are treated as constants by ``jax.grad`` (``stop_gradient``), as
in the references, which compute them as Python floats.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradsafe._checks import (
    check_axis_name,
    check_bool,
    check_choice,
    check_int,
    check_scalar,
    is_traced,
)
from gradsafe._metrics import register_stats
from gradsafe._numerics import (
    TORCH_NORM_EPS,
    AxisName,
    ScalarOrSchedule,
    abs_sq,
    accumulation_dtype,
    as_float32,
    float_leaves,
    global_norm,
    is_float_leaf,
    largest,
    leaf_norm,
    leaf_norms_of,
    magnitude,
    map_float_leaves,
    nonnegative,
    reduce_across_devices,
    resolve,
    safe_increment,
    safe_sqrt,
    scale_leaf,
    scale_tree,
    tree_accumulation_dtype,
    zero_count,
    zero_scalar,
)
from gradsafe._numerics import (
    clip_factor as clip_to,
)
from gradsafe._stats import Moments, running_moments

_F32 = jnp.float32
_INF = float("inf")


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x).astype(_F32)


def _one_minus(hyperparameter: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    """``1 - value`` in float32, taken in float64 first for Python numbers as the references do
    (``1 - 0.999`` rounds to a different float32 than ``1 - float32(0.999)``)."""
    if isinstance(hyperparameter, (int, float)) and not isinstance(hyperparameter, bool):
        return jnp.asarray(1.0 - float(hyperparameter), _F32)
    return 1 - resolve(hyperparameter, count)


# --------------------------------------------------------------------------------------------
# zclip
# --------------------------------------------------------------------------------------------


@register_stats(
    "zclip",
    "norm",
    "threshold",
    "scale",
    "clipped",
    "spike",
    "capped",
    "zscore",
    "mean",
    "var",
    "count",
)
class ZClipState(NamedTuple):
    """State of :func:`zclip`.

    Attributes:
      count: steps seen (int32, saturating).
      samples: finite norms absorbed by the warm-up (stops growing once it is over).
      mean: during warm-up the running mean of the norms, then the EMA :math:`\\mu`.
      var: during warm-up the running population variance, then the EMA :math:`\\sigma^2`.
      norm: the global norm of this step's gradient, before clipping.
      threshold: the bound in force this step (``max_norm`` during warm-up; ``inf`` if none).
      scale: the factor applied to every leaf.
      clipped: whether the norm exceeded the threshold (the torch-style warm-up clip also
        scales a norm just below ``max_norm`` by :math:`c/(N+10^{-6})`; that is not counted).
      spike: whether this step's norm was flagged as a z-score spike (never during warm-up).
      zscore: :math:`z = (N - \\mu) / (\\sigma + \\epsilon)` (0 during warm-up).
      capped: whether the fixed cap ``max_norm`` clipped this step, i.e. the norm exceeded
        it and it was the bound in force (during warm-up, or when it is below the adaptive
        threshold, or on a step that is no spike). A step can be a ``spike``, ``capped``,
        both or neither; ``clipped`` is whether the gradient was scaled down for any reason.
    """

    count: jax.Array
    samples: jax.Array
    mean: jax.Array
    var: jax.Array
    norm: jax.Array
    threshold: jax.Array
    scale: jax.Array
    clipped: jax.Array
    spike: jax.Array
    zscore: jax.Array
    capped: jax.Array


def zclip(
    alpha: ScalarOrSchedule = 0.97,
    z_thresh: ScalarOrSchedule = 2.5,
    *,
    max_norm: ScalarOrSchedule | None = 1.0,
    eps: float = 1e-6,
    warmup_steps: int = 25,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    clip_factor: ScalarOrSchedule = 1.0,
    skip_update_on_spike: bool = False,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """ZClip: clip the global norm when it is a z-score outlier of its own recent history.

    With :math:`N` the global L2 norm, :math:`\\mu, \\sigma^2` EMAs of past norms,
    :math:`z = (N - \\mu)/(\\sigma + \\epsilon)`, :math:`z_t` = ``z_thresh`` and :math:`c` =
    ``max_norm``:

    * **Warm-up** (the first ``warmup_steps`` finite norms): the norms are collected, the
      gradient is clipped at :math:`c` exactly as ``torch.nn.utils.clip_grad_norm_`` does
      (:math:`\\min(1, c/(N + 10^{-6}))`), and at the end :math:`\\mu` and :math:`\\sigma^2` are
      their mean and population variance.
    * **Spike test**: ``mode="zscore"``: spike if :math:`z > z_t`, with threshold
      :math:`T = f\\,(\\mu + z_t\\sigma / (z / z_t))` for ``clip_option="adaptive_scaling"``
      (:math:`f` = ``clip_factor``, applied to the whole threshold) or :math:`T = \\mu` for
      ``"mean"``. ``mode="percentile"``: spike if :math:`N > T = \\mu + z_t\\sigma`.
    * **Clip**: :math:`T_{eff} = \\min(T \\text{ if spike else } N, c)`; if
      :math:`N > T_{eff}`: :math:`g \\leftarrow g \\cdot T_{eff} / (N + 10^{-6})`.
    * **Statistics**: with :math:`x = T` on a spike and :math:`N` otherwise,
      :math:`\\mu \\leftarrow \\alpha\\mu + (1-\\alpha)x`, then
      :math:`\\sigma^2 \\leftarrow \\alpha\\sigma^2 + (1-\\alpha)(x - \\mu)^2` with the *new*
      :math:`\\mu`. With ``skip_update_on_spike`` a spike leaves them unchanged.

    These are the numbers of the published ``zclip`` 1.0.0 package. Note that the default
    ``max_norm=1.0`` makes ZClip *also a fixed clipper at 1.0* (the threshold is the smaller of
    the adaptive one and ``max_norm``); pass ``max_norm=None`` for purely adaptive clipping.

    Differences from the reference:
      * The warm-up keeps a running mean and variance (Welford) instead of a list of norms:
        O(1) state, equal to the two-pass figures to float32 rounding. ``warmup_steps=0``
        behaves as 1, as in the reference.
      * A gradient holding NaN or Inf passes through unchanged and leaves the statistics
        alone (the reference would poison its mean forever); pair with
        :func:`gradsafe.skip_nonfinite` to refuse such steps. A finite gradient whose float32
        sum of squares overflows (norm above ~1.8e19) has a finite norm here (see
        :func:`gradsafe.global_norm`) and is clipped; the reference's norm is Inf there.
      * ``capped`` in the state tells a clip by the fixed ``max_norm`` apart from a z-score
        ``spike``; the reference records neither.
      * Statistics are float32 arrays in the state (jittable, checkpointable), not Python
        floats synchronised to the host every step.

    Args:
      alpha: EMA factor :math:`\\alpha \\in (0, 1)` for the mean and variance.
      z_thresh: :math:`z_t > 0`; a number or a schedule.
      max_norm: cap :math:`c \\ge 0` on the threshold (and warm-up clip); ``None`` disables it.
      eps: :math:`\\epsilon > 0` in the z-score denominator.
      warmup_steps: number of norms collected before the statistics are initialised.
      mode: ``"zscore"`` or ``"percentile"``.
      clip_option: ``"adaptive_scaling"`` or ``"mean"`` (used by ``mode="zscore"``).
      clip_factor: :math:`f > 0`, multiplies the adaptive-scaling threshold.
      skip_update_on_spike: keep the statistics unchanged on a spike.
      axis_name: mesh axis name(s) to reduce the norm over inside ``shard_map``/``pmap``.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`ZClipState`.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> tx = gs.zclip(warmup_steps=2, max_norm=None)
      >>> state = tx.init(jnp.zeros(2))
      >>> for g in ([0.6, 0.8], [0.0, 1.2], [0.0, 1.0]):
      ...     _, state = tx.update(jnp.array(g), state)
      >>> round(float(state.mean), 4), bool(state.spike)
      (1.097, False)
      >>> spiked, state = tx.update(jnp.array([0.0, 50.0]), state)
      >>> bool(state.spike), round(float(state.threshold), 4)
      (True, 1.0983)

    References:
      Kumar, Owen, Ashraf Bhatti and Narayan, `ZClip: Adaptive Spike Mitigation for LLM
      Pre-Training <https://arxiv.org/abs/2504.02507>`_, 2025.
    """
    check_scalar("alpha", alpha, lower=0.0, lower_inclusive=False, upper=1.0, upper_inclusive=False)
    check_scalar("z_thresh", z_thresh, lower=0.0, lower_inclusive=False)
    if max_norm is not None:
        check_scalar("max_norm", max_norm)
    check_scalar("eps", eps, lower=0.0, lower_inclusive=False)
    check_int("warmup_steps", warmup_steps, lower=0)
    check_choice("mode", mode, ("zscore", "percentile"))
    check_choice("clip_option", clip_option, ("adaptive_scaling", "mean"))
    check_scalar("clip_factor", clip_factor, lower=0.0, lower_inclusive=False)
    check_bool("skip_update_on_spike", skip_update_on_spike)
    check_axis_name(axis_name)

    def init_fn(params: Any) -> ZClipState:
        del params
        cap = _INF if max_norm is None else resolve(max_norm, zero_count())
        return ZClipState(
            count=zero_count(),
            samples=zero_count(),
            mean=zero_scalar(),
            var=zero_scalar(),
            norm=zero_scalar(),
            threshold=_f32(cap),
            scale=jnp.ones([], _F32),
            clipped=jnp.array(False),
            spike=jnp.array(False),
            zscore=zero_scalar(),
            capped=jnp.array(False),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        count = state.count
        a = resolve(alpha, count)
        zt = resolve(z_thresh, count)
        factor = resolve(clip_factor, count)
        cap = jnp.asarray(_INF, _F32) if max_norm is None else resolve(max_norm, count)
        eps_ = resolve(eps, count)
        warmup = jnp.maximum(jnp.asarray(warmup_steps, jnp.int32), 1)

        # The scale comes from the norm in its accumulation dtype; the statistics keep it in
        # float32, saturated (a finite float64 norm may exceed the float32 range).
        wide = global_norm(updates, axis_name=axis_name)
        norm = as_float32(wide)
        finite = jnp.isfinite(norm)
        x = jax.lax.stop_gradient(norm)
        warming = state.samples < warmup

        # Adaptive phase (the norm is finite for every finite gradient, see global_norm).
        std = safe_sqrt(state.var)
        z = (x - state.mean) / (std + eps_)
        if mode == "percentile":
            adaptive = state.mean + zt * std
            spike = x > adaptive
        else:
            if clip_option == "adaptive_scaling":
                adaptive = (state.mean + (zt * std) / (z / zt)) * factor
            else:
                adaptive = state.mean
            spike = z > zt
        spike = jnp.logical_and(spike, ~warming)
        moments = running_moments(
            Moments(state.mean, state.var),
            state.samples,
            x,
            warming=warming,
            ema_input=jnp.where(spike, adaptive, x),
            weight=a,
            rest=_one_minus(alpha, count),
            form="zclip",
            frozen=spike if skip_update_on_spike else False,
        )

        threshold = jnp.where(warming, cap, jnp.minimum(jnp.where(spike, adaptive, _INF), cap))
        threshold = jax.lax.stop_gradient(threshold)
        if max_norm is None:
            warm_scale = jnp.ones([], wide.dtype)
        else:  # torch's clip_grad_norm_ factor, also applied just below the cap
            warm_scale = clip_to(wide, threshold, eps=TORCH_NORM_EPS, always=True)
        scale = jnp.where(warming, warm_scale, clip_to(wide, threshold, eps=TORCH_NORM_EPS))
        clipped = finite & (x > threshold)
        new_state = ZClipState(
            count=safe_increment(count),
            samples=jnp.where(finite & warming, state.samples + 1, state.samples),
            mean=moments.mean,
            var=moments.var,
            norm=x,
            threshold=threshold,
            scale=jax.lax.stop_gradient(scale).astype(_F32),
            clipped=clipped,
            spike=spike,
            zscore=jnp.where(warming, 0.0, z),
            capped=clipped & (max_norm is not None) & (threshold >= cap),
        )
        return scale_tree(updates, scale), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# autoclip
# --------------------------------------------------------------------------------------------


@register_stats("autoclip", "norm", "threshold", "scale", "clipped", "count", "samples")
class AutoClipState(NamedTuple):
    """State of :func:`autoclip`.

    Attributes:
      count: steps seen (int32, saturating).
      samples: finite norms that joined the history.
      history: ``window=W``: the last ``W`` norms (a ring buffer, slot ``samples % W``);
        ``window=None``: the five P² marker heights (the sorted norms while fewer than five).
      positions: the P² marker positions (1-based, int32); one unused entry for ``window=W``.
      norm: the global norm of this step's gradient, before clipping.
      threshold: the percentile of the history (this step's norm included): the clip bound.
      scale: the factor applied to every leaf.
      clipped: whether the norm exceeded the threshold (torch's clip also scales a norm at the
        threshold by :math:`\\eta/(\\eta+10^{-6})`; that is not counted).
    """

    count: jax.Array
    samples: jax.Array
    history: jax.Array
    positions: jax.Array
    norm: jax.Array
    threshold: jax.Array
    scale: jax.Array
    clipped: jax.Array


def _lerp(low: jax.Array, high: jax.Array, t: jax.Array) -> jax.Array:
    """numpy's ``_lerp``: ``a + (b-a) t``, or ``b - (b-a)(1-t)`` for ``t >= 0.5``."""
    diff = high - low
    return jnp.where(t >= 0.5, high - diff * (1 - t), low + diff * t)


def _sorted_percentile(values: jax.Array, n: jax.Array, q: jax.Array) -> jax.Array:
    """``np.percentile(values[:n], 100 q)`` (linear) for ascending ``values``; inf if n = 0."""
    size = values.shape[0]
    last = jnp.maximum(n - 1, 0)
    position = q * last.astype(_F32)
    below = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, size - 1)
    above = jnp.minimum(below + 1, last)
    t = position - below.astype(_F32)
    value = _lerp(values[below], values[jnp.minimum(above, size - 1)], t)
    return jnp.where(n > 0, value, _INF)


def _p2_insert(heights: jax.Array, positions: jax.Array, x: jax.Array, count: jax.Array, q):
    """One P² step (Jain & Chlamtac 1985) for the ``q`` quantile, branch-free.

    ``count`` is the number of observations including ``x`` (>= 6 where the result is used).
    """
    heights = heights.at[0].min(x).at[4].max(x)
    cell = jnp.sum((x >= heights[1:4]).astype(jnp.int32))  # 0..3
    positions = positions + (jnp.arange(5) > cell).astype(jnp.int32)
    steps = (count - 1).astype(_F32)
    increments = jnp.stack([jnp.zeros_like(q), q / 2, q, (1 + q) / 2, jnp.ones_like(q)])
    desired = 1.0 + steps * increments
    for i in (1, 2, 3):
        n_prev, n_i, n_next = positions[i - 1], positions[i], positions[i + 1]
        q_prev, q_i, q_next = heights[i - 1], heights[i], heights[i + 1]
        gap = desired[i] - n_i.astype(_F32)
        up = (gap >= 1) & (n_next - n_i > 1)
        down = (gap <= -1) & (n_prev - n_i < -1)
        move = up | down
        step = jnp.where(up, 1, -1).astype(jnp.int32)
        d = step.astype(_F32)
        span = (n_next - n_prev).astype(_F32)
        right = (n_next - n_i).astype(_F32)
        left = (n_i - n_prev).astype(_F32)
        parabolic = q_i + d / span * (
            (left + d) * (q_next - q_i) / right + (right - d) * (q_i - q_prev) / left
        )
        q_side = jnp.where(up, q_next, q_prev)
        n_side = jnp.where(up, right, -left)
        linear = q_i + d * (q_side - q_i) / n_side
        inside = (q_prev < parabolic) & (parabolic < q_next)
        candidate = jnp.where(inside, parabolic, linear)
        heights = heights.at[i].set(jnp.where(move, candidate, q_i))
        positions = positions.at[i].set(jnp.where(move, n_i + step, n_i))
    return heights, positions


def _p2_estimate(heights: jax.Array, samples: jax.Array, q: jax.Array) -> jax.Array:
    """The percentile estimate: exact for <= 5 samples, else the P² middle marker
    (the exact minimum / maximum for q = 0 / 1)."""
    exact = _sorted_percentile(heights, jnp.minimum(samples, 5), q)
    marker = jnp.where(q <= 0, heights[0], jnp.where(q >= 1, heights[4], heights[2]))
    return jnp.where(samples <= 5, exact, marker)


def autoclip(
    percentile: ScalarOrSchedule = 10.0, *, window: int | None = None, axis_name: AxisName = None
) -> optax.GradientTransformationExtraArgs:
    """AutoClip: clip the global norm to a percentile of the norms seen so far.

    Each step the global L2 norm :math:`N_t` joins the history *first*, then
    :math:`\\eta_t = \\operatorname{percentile}_p(N_1, \\dots, N_t)` (numpy's linear
    interpolation) and the gradient is clipped as ``torch.nn.utils.clip_grad_norm_`` would:

    .. math:: g \\leftarrow g \\cdot \\min\\big(1, \\eta_t / (N_t + 10^{-6})\\big)

    So the first step is (almost) never clipped, ``percentile=0`` clips to the smallest norm
    seen and ``percentile=100`` does not clip.

    * ``window=W``: the exact percentile of the last ``W`` norms (a ring buffer of ``W``
      floats, one sort of ``W`` values per step). With ``W`` at least the number of steps this
      is the reference algorithm exactly.
    * ``window=None`` (default): the whole history in O(1) memory with the P² streaming
      quantile estimator (5 markers: 5 floats and 5 ints), updated branch-free. The first five
      steps are exact. Accuracy, measured in the tests on 10 000 norms (normal, log-normal and
      heavy-tailed Student-t with planted spikes), checked at every 250th step from the
      1000th: for normal and log-normal norms at ``p`` = 10, 50 and 90 the estimate's rank
      is within 1 percentile point of ``p`` and its value within 3% of the exact
      whole-history percentile; for the heavy-tailed norms the same holds at the default
      ``p=10``, but at ``p`` = 50 and 90 the rank error reaches about 6 points (30% in value)
      before settling. ``p`` = 0 and 100 are exact (the markers track the minimum and
      maximum); use ``window=W`` where an exact figure matters.

    Differences from the reference:
      * The reference keeps the whole history (O(T) memory, an O(T log T) percentile each
        step on the host); ``window=None`` estimates it, ``window=W`` bounds it.
      * A gradient holding NaN or Inf does not join the history and passes through
        unchanged (the reference's clip would turn it into NaN). A finite gradient whose
        float32 squares overflow has a finite norm here and is clipped.

    Args:
      percentile: :math:`p \\in [0, 100]`; a number or a schedule (P² adapts gradually to a
        changing ``p``).
      window: ``None`` for P² over the whole history, or the ring-buffer length ``W >= 1``.
        Under ``optax.inject_hyperparams`` list it in ``static_args`` (it sets a shape).
      axis_name: mesh axis name(s) to reduce the norm over inside ``shard_map``/``pmap``.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`AutoClipState`.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> tx = gs.autoclip(50.0, window=8)
      >>> state = tx.init(jnp.zeros(1))
      >>> for g in (1.0, 3.0, 2.0):
      ...     _, state = tx.update(jnp.array([g]), state)
      >>> clipped, state = tx.update(jnp.array([10.0]), state)
      >>> float(state.threshold), clipped
      (2.5, Array([2.4999998], dtype=float32))

    References:
      Seetharaman, Wichern, Pardo and Le Roux, `AutoClip: Adaptive Gradient Clipping for
      Source Separation Networks <https://arxiv.org/abs/2007.14469>`_, MLSP 2020.
      Jain and Chlamtac, `The P² algorithm for dynamic calculation of quantiles and histograms
      without storing observations <https://doi.org/10.1145/4372.4378>`_, CACM 1985.
    """
    check_scalar("percentile", percentile, lower=0.0, upper=100.0)
    check_int("window", window, lower=1, allow_none=True)
    check_axis_name(axis_name)

    def init_fn(params: Any) -> AutoClipState:
        del params
        if window is None:
            history = jnp.full([5], _INF, _F32)
            positions = jnp.arange(1, 6, dtype=jnp.int32)
        else:
            if is_traced(window):
                raise ValueError(
                    "window sets the shape of the state: list it in static_args of "
                    "optax.inject_hyperparams"
                )
            history = jnp.zeros([int(np.asarray(window))], _F32)
            # Unused with a window; one entry, not zero, because orbax refuses zero-size arrays.
            positions = jnp.zeros([1], jnp.int32)
        return AutoClipState(
            count=zero_count(),
            samples=zero_count(),
            history=history,
            positions=positions,
            norm=zero_scalar(),
            threshold=jnp.asarray(_INF, _F32),
            scale=jnp.ones([], _F32),
            clipped=jnp.array(False),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        q = resolve(percentile, state.count) / 100.0
        wide = global_norm(updates, axis_name=axis_name)  # the scale's norm (see zclip)
        norm = as_float32(wide)
        finite = jnp.isfinite(norm)
        x = jax.lax.stop_gradient(norm)
        samples = jnp.where(finite, safe_increment(state.samples), state.samples)
        if window is not None:  # exact ring buffer
            size = state.history.shape[0]
            slot = jnp.mod(state.samples, size)
            history = jnp.where(finite, state.history.at[slot].set(x), state.history)
            positions = state.positions
            filled = jnp.minimum(samples, size)
            ordered = jnp.sort(jnp.where(jnp.arange(size) < filled, history, _INF))
            threshold = _sorted_percentile(ordered, filled, q)
        else:  # P²
            filling = jnp.sort(state.history.at[4].set(x))
            markers, moved = _p2_insert(state.history, state.positions, x, samples, q)
            early = state.samples < 5
            history = jnp.where(early, filling, markers)
            positions = jnp.where(early, state.positions, moved)
            history = jnp.where(finite, history, state.history)
            positions = jnp.where(finite, positions, state.positions)
            threshold = _p2_estimate(history, samples, q)
        threshold = jax.lax.stop_gradient(threshold)
        scale = clip_to(wide, threshold, eps=TORCH_NORM_EPS, always=True)
        new_state = AutoClipState(
            count=safe_increment(state.count),
            samples=samples,
            history=history,
            positions=positions,
            norm=x,
            threshold=threshold,
            scale=jax.lax.stop_gradient(scale).astype(_F32),
            clipped=finite & (x > threshold),
        )
        return scale_tree(updates, scale), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# adagc
# --------------------------------------------------------------------------------------------


@register_stats("adagc", "norm", "threshold", "scale", "clipped", "count")
class AdaGCState(NamedTuple):
    """State of :func:`adagc`.

    Attributes:
      count: steps seen (int32, saturating).
      gamma: :math:`\\gamma`, one float32 per float leaf (``scope="leaf"``, in
        ``jax.tree.leaves`` order) or a scalar (``scope="global"``); ``inf`` until set.
      norm: the global norm of this step's gradient, before clipping.
      threshold: ``warmup_max_norm`` during warm-up; then :math:`\\lambda\\gamma` (global),
        or the norm of the per-leaf bounds :math:`\\sqrt{\\sum_i (\\lambda\\gamma_i)^2}` (leaf).
      scale: the factor applied (the smallest per-leaf factor for ``scope="leaf"``).
      clipped: whether any leaf was scaled down.
    """

    count: jax.Array
    gamma: jax.Array
    norm: jax.Array
    threshold: jax.Array
    scale: jax.Array
    clipped: jax.Array


def adagc(
    relative: ScalarOrSchedule = 1.04,
    beta: ScalarOrSchedule = 0.99,
    *,
    warmup_steps: int = 100,
    warmup_max_norm: ScalarOrSchedule = 1.0,
    scope: str = "leaf",
    eps: float = 1e-6,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """AdaGC: clip each tensor relative to an EMA of its own (clipped) gradient norms.

    With :math:`n_i = \\|g_i\\|_2` per leaf (``scope="leaf"``) or the global norm
    (``scope="global"``, AdaGC-Global), :math:`\\lambda` = ``relative``, :math:`\\beta` =
    ``beta``, :math:`c` = ``warmup_max_norm``:

    * **Warm-up** (the first ``warmup_steps`` steps): global clipping,
      :math:`g \\leftarrow g \\cdot c/(N + \\epsilon)` when that factor is below 1, and
      :math:`\\gamma_i` = the smallest post-clip norm seen (``scope="global"``:
      :math:`\\min(N, c)`, as in the reference).
    * **Then**: if :math:`n_i > \\lambda\\gamma_i`:
      :math:`g_i \\leftarrow g_i \\cdot \\lambda\\gamma_i / (n_i + \\epsilon)` and
      :math:`n_i \\leftarrow \\lambda\\gamma_i`; then
      :math:`\\gamma_i \\leftarrow \\beta\\gamma_i + (1-\\beta) n_i`. With
      ``warmup_steps=0``, :math:`\\gamma_i` starts at the first norm.

    Because :math:`\\lambda = 1.04` is close to 1, each tensor's norm can grow at most about 4%
    per step relative to its EMA: a rate limiter as much as a spike filter. A tensor whose
    gradient is exactly zero at some warm-up step gets :math:`\\gamma_i = 0` and stays clipped
    to zero afterwards, as in the reference.

    Differences from the reference:
      * A tensor holding NaN or Inf leaves its :math:`\\gamma_i` unchanged and passes
        unclipped (the reference's EMA would become NaN for good). A finite tensor whose
        float32 squares overflow has a finite norm here and is clipped.
      * ``update`` raises ``ValueError`` when the updates have a different number of float
        leaves than ``init`` saw (``scope="leaf"``), instead of broadcasting :math:`\\gamma`.
      * The warm-up post-clip norm is :math:`n_i` times the clip factor rather than a norm
        recomputed from the clipped tensor: equal to float32 rounding.

    Args:
      relative: :math:`\\lambda > 0`; a number or a schedule.
      beta: :math:`\\beta \\in [0, 1)`; a number or a schedule.
      warmup_steps: number of global-clipping steps that seed :math:`\\gamma`.
      warmup_max_norm: :math:`c \\ge 0`, the global clip during warm-up.
      scope: ``"leaf"`` (AdaGC, one :math:`\\gamma` per float leaf) or ``"global"``
        (AdaGC-Global, one :math:`\\gamma`).
      eps: :math:`\\epsilon > 0` in the clip factors.
      axis_name: mesh axis name(s) to reduce norms over inside ``shard_map``/``pmap``; a leaf
        sharded across devices is clipped by its whole norm.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`AdaGCState`.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> tx = gs.adagc(warmup_steps=1)
      >>> grads = {"a": jnp.array([0.3, 0.4]), "b": jnp.array([0.1])}
      >>> state = tx.init(grads)
      >>> _, state = tx.update(grads, state)
      >>> state.gamma
      Array([0.5, 0.1], dtype=float32)
      >>> spiked, state = tx.update({"a": jnp.array([30.0, 40.0]), "b": jnp.array([0.1])}, state)
      >>> spiked["a"], spiked["b"]
      (Array([0.312, 0.416], dtype=float32), Array([0.1], dtype=float32))

    References:
      Wang, Li et al., `AdaGC: Improving Training Stability for Large Language Model
      Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025.
    """
    check_scalar("relative", relative, lower=0.0, lower_inclusive=False)
    check_scalar("beta", beta, lower=0.0, upper=1.0, upper_inclusive=False)
    check_int("warmup_steps", warmup_steps, lower=0)
    check_scalar("warmup_max_norm", warmup_max_norm)
    check_choice("scope", scope, ("leaf", "global"))
    check_scalar("eps", eps, lower=0.0, lower_inclusive=False)
    check_axis_name(axis_name)

    def init_fn(params: Any) -> AdaGCState:
        shape = [len(float_leaves(params))] if scope == "leaf" else []
        return AdaGCState(
            count=zero_count(),
            gamma=jnp.full(shape, _INF, _F32),
            norm=zero_scalar(),
            threshold=resolve(warmup_max_norm, zero_count()),
            scale=jnp.ones([], _F32),
            clipped=jnp.array(False),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        count = state.count
        ratio = resolve(relative, count)
        decay = resolve(beta, count)
        cap = resolve(warmup_max_norm, count)
        eps_ = resolve(eps, count)
        warming = count < jnp.asarray(warmup_steps, jnp.int32)
        leaves = float_leaves(updates)
        if scope == "leaf":
            if len(leaves) != state.gamma.shape[0]:
                raise ValueError(
                    f"adagc: the updates have {len(leaves)} float leaves but the state was "
                    f"initialised for {state.gamma.shape[0]}; pass updates with the tree "
                    "given to init"
                )
            # Scales come from the norms in their accumulation dtype; the statistics keep them
            # in float32, saturated (a finite float64 norm may exceed the float32 range).
            dtype = tree_accumulation_dtype(leaves)
            leaf_list = leaf_norms_of(leaves, 2, axis_name=axis_name)
            wide_norms = (
                jnp.stack([n.astype(dtype) for n in leaf_list]) if leaves else jnp.zeros([0])
            )
            wide_total = leaf_norm(wide_norms)
        else:
            wide_total = global_norm(updates, axis_name=axis_name)
            wide_norms = wide_total
        total = as_float32(wide_total)
        norms = as_float32(wide_norms)
        n = jax.lax.stop_gradient(norms)
        finite = jnp.isfinite(n)
        total_finite = jnp.isfinite(total)

        # Warm-up: global clip, gamma = smallest post-clip norm.
        cap = nonnegative(cap)
        warm_scale = clip_to(jax.lax.stop_gradient(wide_total), cap, eps=eps_, always=True)
        warm_clip = (warm_scale < 1) & total_finite
        wide_n = jax.lax.stop_gradient(wide_norms)
        post = jnp.minimum(n, cap) if scope == "global" else as_float32(wide_n * warm_scale)
        warm_gamma = jnp.where(finite, jnp.minimum(state.gamma, post), state.gamma)

        # Adaptive phase.
        previous = jnp.where(jnp.isinf(state.gamma), n, state.gamma)
        bound = nonnegative(ratio * previous)
        clip = (n > bound) & finite
        adaptive_scale = clip_to(wide_n, bound, eps=eps_)
        effective = jnp.where(clip, bound, n)
        ema = previous * decay + effective * _one_minus(beta, count)
        adaptive_gamma = jnp.where(finite, jnp.minimum(ema, largest(_F32)), state.gamma)

        scales = jnp.where(warming, warm_scale, adaptive_scale)
        clipped_any = jnp.where(warming, warm_clip, jnp.any(clip))
        if scope == "global":
            threshold = jnp.where(warming, cap, bound)
            updates = scale_tree(updates, scales)
            smallest = scales
        else:
            bounds_norm = leaf_norm(jnp.where(jnp.isinf(bound), 0.0, bound))
            threshold = jnp.where(warming, cap, bounds_norm)
            remaining = iter(range(len(leaves)))
            updates = map_float_leaves(lambda x: scale_leaf(x, scales[next(remaining)]), updates)
            smallest = jnp.min(scales, initial=1.0)
        new_state = AdaGCState(
            count=safe_increment(count),
            gamma=jnp.where(warming, warm_gamma, adaptive_gamma),
            norm=jax.lax.stop_gradient(total),
            threshold=threshold,
            scale=jax.lax.stop_gradient(smallest).astype(_F32),
            clipped=clipped_any,
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# spike_clip
# --------------------------------------------------------------------------------------------


@register_stats("spike_clip", "norm", "threshold", "clipped", "clipped_fraction", "count")
class SpikeClipState(NamedTuple):
    """State of :func:`spike_clip`.

    Attributes:
      count: steps seen (int32, saturating).
      nu: :math:`v`, the EMA of :math:`g^2`: one float32 per parameter (float64 for float64
        leaves under x64), ``None`` for leaves that are not floats.
      norm: the global norm of this step's gradient, before clipping.
      threshold: :math:`\\theta` in force this step.
      clipped: whether any entry was clipped.
      clipped_fraction: the fraction of entries clipped.
    """

    count: jax.Array
    nu: Any
    norm: jax.Array
    threshold: jax.Array
    clipped: jax.Array
    clipped_fraction: jax.Array


def spike_clip(
    threshold: ScalarOrSchedule = 5000.0,
    *,
    beta2: ScalarOrSchedule = 0.999,
    warmup_steps: int = 20,
    reset_interval: int | None = None,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """SPAM's spike-aware clipping: cut entries whose square exceeds ``threshold`` times
    their running mean square.

    With :math:`v` an EMA of :math:`g^2` (no bias correction, from the *previous* steps) and
    :math:`\\theta` = ``threshold``, entry-wise:

    .. math:: g_j \\leftarrow \\operatorname{sign}(g_j)\\sqrt{\\theta v_j}
              \\quad\\text{if } g_j^2 > \\theta v_j, \\qquad
              v \\leftarrow \\beta_2 v + (1 - \\beta_2) g^2 \\ (\\text{clipped } g)

    Clipping starts at step ``warmup_steps`` (counted from 1; the earlier steps only feed
    :math:`v`), exactly as in SPAM, where :math:`v \\approx 0` would clip everything. The state
    holds :math:`v`: **one float32 per parameter** (as much memory as Adam's second moment);
    to reuse an optimizer's own moment instead, see the SPAM optimizer itself.

    ``reset_interval=K`` reproduces SPAM's momentum reset as seen by the clip: :math:`v` is
    zeroed at steps :math:`K, 2K, \\dots` (counted from 1, as in SPAM) and clipping pauses
    while ``step % K < warmup_steps``. The default ``None`` never resets.

    Differences from the reference:
      * Squares are taken in float32 (float64 under x64) whatever the gradient's dtype, the
        test compares :math:`|g_j|` with :math:`\\sqrt{\\theta}\\sqrt{v_j}` (no overflow for
        finite entries), and a non-finite entry passes through and leaves its :math:`v_j`
        unchanged (the reference's :math:`v_j` would stay NaN and never clip that entry
        again).
      * An entry with :math:`v_j = 0` (no history: every earlier gradient of it was 0, or a
        reset) is not clipped; the reference cuts it to 0. So ``warmup_steps`` of 0 or 1 is
        safe: the first step cannot zero every update and then keep :math:`v` at 0 forever.
      * Complex entries are clipped on their modulus, keeping their phase.

    Args:
      threshold: :math:`\\theta > 0`; a number or a schedule.
      beta2: :math:`\\beta_2 \\in [0, 1)` of the EMA of :math:`g^2`; a number or a schedule.
      warmup_steps: clipping starts at this step (counted from 1).
      reset_interval: ``None`` or SPAM's ``DeltaT`` (``>= 1``).
      axis_name: mesh axis name(s) inside ``shard_map``/``pmap`` so the stats (norm, clipped,
        fraction) cover the whole model; the clipping itself is entry-wise.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`SpikeClipState`.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> tx = gs.spike_clip(threshold=4.0, beta2=0.5, warmup_steps=2)
      >>> state = tx.init(jnp.zeros(2))
      >>> _, state = tx.update(jnp.array([1.0, 1.0]), state)
      >>> out, state = tx.update(jnp.array([-10.0, 1.0]), state)
      >>> out, float(state.clipped_fraction)
      (Array([-1.4142135,  1.       ], dtype=float32), 0.5)

    References:
      Huang, Zhu, Jin, Liu, Wang and Liu, `SPAM: Spike-Aware Adam with Momentum Reset for
      Stable LLM Training <https://arxiv.org/abs/2501.06842>`_, ICLR 2025.
    """
    check_scalar("threshold", threshold, lower=0.0, lower_inclusive=False)
    check_scalar("beta2", beta2, lower=0.0, upper=1.0, upper_inclusive=False)
    check_int("warmup_steps", warmup_steps, lower=0)
    check_int("reset_interval", reset_interval, lower=1, allow_none=True)
    check_axis_name(axis_name)

    def init_fn(params: Any) -> SpikeClipState:
        # zeros_like keeps each parameter's sharding (explicit-sharding meshes need it).
        nu = jax.tree.map(
            lambda x: jnp.zeros_like(x, accumulation_dtype(x.dtype)) if is_float_leaf(x) else None,
            params,
        )
        return SpikeClipState(
            count=zero_count(),
            nu=nu,
            norm=zero_scalar(),
            threshold=resolve(threshold, zero_count()),
            clipped=jnp.array(False),
            clipped_fraction=zero_scalar(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        count = state.count
        theta = nonnegative(resolve(threshold, count))
        decay = resolve(beta2, count)
        rest = _one_minus(beta2, count)
        step = count + 1  # SPAM's current_step, counted from 1
        active = step >= jnp.asarray(warmup_steps, jnp.int32)
        reset = jnp.array(False)
        if reset_interval is not None:
            interval = jnp.asarray(reset_interval, jnp.int32)
            reset = jnp.mod(step, interval) == 0
            active = active & (jnp.mod(step, interval) >= warmup_steps)
        nus, treedef = jax.tree.flatten(state.nu, is_leaf=lambda x: x is None)
        grads = treedef.flatten_up_to(updates)
        hits: list[jax.Array] = []
        leaves: list[jax.Array] = []
        sizes: list[int] = []
        outputs: list[Any] = []
        new_nus: list[Any] = []
        for nu, g in zip(nus, grads, strict=True):
            if nu is None or not is_float_leaf(g):
                outputs.append(g)
                new_nus.append(nu)
                continue
            acc = nu.dtype
            nu = jnp.where(reset, jnp.zeros_like(nu), nu)
            # Magnitudes, not squares: g^2 overflows float32 for |g| > 1.8e19.
            size = magnitude(g).astype(acc)
            bound = jnp.sqrt(theta.astype(acc)) * jnp.sqrt(nu)
            # v = 0 means no history for the entry: it is never clipped against it.
            hit = active & (nu > 0) & (size > bound) & jnp.isfinite(size)
            if jnp.iscomplexobj(g):
                direction = g / jnp.where(hit, jnp.abs(g), 1).astype(g.dtype)
                clipped = direction * bound.astype(g.dtype)
            else:
                clipped = jnp.sign(g) * bound.astype(g.dtype)
            out = jnp.where(hit, clipped, g)
            new_square = jnp.minimum(abs_sq(out).astype(acc), largest(acc))
            new_nu = decay.astype(acc) * nu + rest.astype(acc) * new_square
            new_nus.append(jnp.where(jnp.isfinite(size), new_nu, nu))
            outputs.append(out)
            hits.append(jnp.sum(hit.astype(_F32)))
            leaves.append(g)
            sizes.append(g.size)
        new_updates = treedef.unflatten(outputs)
        new_nu = treedef.unflatten(new_nus)
        norm = global_norm(leaves, axis_name=axis_name).astype(_F32)
        if leaves:
            total_hits = reduce_across_devices(hits, leaves, axis_name)
            total_size = reduce_across_devices(
                [jnp.asarray(s, _F32) for s in sizes], leaves, axis_name
            )
            fraction = total_hits / jnp.maximum(total_size, 1.0)
        else:
            fraction = jnp.zeros([], _F32)
        new_state = SpikeClipState(
            count=safe_increment(count),
            nu=new_nu,
            norm=jax.lax.stop_gradient(norm),
            threshold=theta,
            clipped=fraction > 0,
            clipped_fraction=jax.lax.stop_gradient(fraction.astype(_F32)),
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = [
    "AdaGCState",
    "AutoClipState",
    "SpikeClipState",
    "ZClipState",
    "adagc",
    "autoclip",
    "spike_clip",
    "zclip",
]
