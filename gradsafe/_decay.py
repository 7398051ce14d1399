"""Decay: shrink updates over time (:func:`decay`) or for a while after a spike
(:func:`cooldown_on_spike`).

The third form of decay, a threshold that shrinks over time, needs no transform of its own:
every threshold in gradsafe accepts an Optax schedule, e.g.
``gs.clip_by_global_norm(optax.linear_schedule(10.0, 1.0, 1000))``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradsafe._checks import check_axis_name, check_int, check_scalar
from gradsafe._metrics import register_stats
from gradsafe._numerics import (
    AxisName,
    ScalarOrSchedule,
    as_float32,
    global_norm,
    nonnegative,
    resolve,
    safe_increment,
    safe_sqrt,
    scale_tree,
    zero_count,
    zero_scalar,
)
from gradsafe._stats import Moments, running_moments

# Added to the standard deviation before dividing (ZClip's value).
Z_SCORE_EPS = 1e-6
# ``steps_since_spike`` before the first spike: cooled down long ago.
NEVER = np.iinfo(np.int32).max

# --------------------------------------------------------------------------------------------
# decay
# --------------------------------------------------------------------------------------------


@register_stats("decay", "scale", "count")
class DecayState(NamedTuple):
    """State of :func:`decay`: steps seen and the factor applied at the last step."""

    count: jax.Array
    scale: jax.Array


def decay(schedule: ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
    """Multiply the updates by ``schedule(step)``.

    .. math:: g_t \\leftarrow s(t)\\, g_t

    with :math:`t` counted from 0 by this transform. The factor is computed in float32 and cast
    to each leaf's dtype (every leaf keeps its dtype); integer, bool and ``None`` leaves pass
    through. Like ``optax.scale_by_schedule``, but with the factor in its state for
    :func:`gradsafe.metrics` and a constant accepted as well.

    Args:
      schedule: an Optax schedule ``step -> factor`` (e.g. ``optax.cosine_decay_schedule``),
        or a constant number.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`DecayState`.

    Example:
      >>> import jax.numpy as jnp, optax, gradsafe as gs
      >>> tx = gs.decay(optax.linear_schedule(1.0, 0.0, transition_steps=4))
      >>> state = tx.init(jnp.zeros(1))
      >>> for _ in range(3):
      ...     u, state = tx.update(jnp.ones(1), state)
      >>> u, float(state.scale)
      (Array([0.5], dtype=float32), 0.5)

    References:
      Optax, :func:`optax.scale_by_schedule`.
    """
    check_scalar("schedule", schedule, lower=None)

    def init_fn(params: Any) -> DecayState:
        del params
        return DecayState(zero_count(), jnp.ones([], jnp.float32))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        scale = resolve(schedule, state.count)
        return scale_tree(updates, scale), DecayState(safe_increment(state.count), scale)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# cooldown_on_spike
# --------------------------------------------------------------------------------------------


@register_stats("cooldown_on_spike", "norm", "z", "scale", "spike", "spikes", "count")
class CooldownOnSpikeState(NamedTuple):
    """State of :func:`cooldown_on_spike`.

    Attributes:
      count: steps seen (int32, saturating).
      norm: the global norm of the incoming updates.
      z: its z-score against the statistics before this step (0 during warm-up and for
        non-finite norms).
      scale: the factor applied this step.
      spike: whether this step was detected as a spike.
      spikes: spikes detected so far (int32, saturating).
      steps_since_spike: steps since the last spike (0 on a spike step; int32 maximum before
        the first).
      mean: the EMA of finite norms (the exact mean during warm-up).
      var: the EMA of their variance (the exact population variance during warm-up).
      samples: finite norms seen (int32, saturating); warm-up ends at ``warmup_steps``.
    """

    count: jax.Array
    norm: jax.Array
    z: jax.Array
    scale: jax.Array
    spike: jax.Array
    spikes: jax.Array
    steps_since_spike: jax.Array
    mean: jax.Array
    var: jax.Array
    samples: jax.Array


def cooldown_on_spike(
    *,
    z_thresh: ScalarOrSchedule = 4.0,
    factor: ScalarOrSchedule = 0.1,
    recovery_steps: int = 100,
    alpha: float = 0.97,
    warmup_steps: int = 25,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """After a gradient-norm spike, shrink the updates and ramp them back up along a cosine.

    With :math:`N_t` the global norm of the incoming updates, :math:`\\mu, \\sigma^2` the
    running mean and variance of past norms and :math:`z_t = (N_t - \\mu)/(\\sigma + 10^{-6})`,
    a step is a spike when :math:`z_t >` ``z_thresh`` (one-sided: small norms are never spikes).
    With :math:`j` the number of steps since the last spike (0 on the spike step) and
    :math:`R` = ``recovery_steps``, the updates are multiplied by

    .. math::
        s_t = \\begin{cases} f + (1 - f)\\,\\frac{1 - \\cos(\\pi j / R)}{2} & j < R \\\\
              1 & j \\ge R \\text{ or no spike yet} \\end{cases}

    with :math:`f` = ``factor``: :math:`f` on the spike, back to 1 after :math:`R` steps (with
    :math:`R = 0`, :math:`f` on the spike step only); a new spike during the ramp restarts it.

    Statistics: the first ``warmup_steps`` finite norms give the exact mean and population
    variance (Welford), with no detection. Afterwards each finite norm, capped at
    :math:`\\mu + z_{thresh}\\,\\sigma` on a spike so that one spike does not inflate the
    statistics yet a lasting rise in the norm is followed, updates exponential moving averages
    with weight :math:`\\alpha`: :math:`\\delta = x - \\mu`, :math:`\\mu \\leftarrow \\mu +
    (1-\\alpha)\\delta`, :math:`\\sigma^2 \\leftarrow \\alpha(\\sigma^2 + (1-\\alpha)\\delta^2)`.
    A NaN or Inf norm is recorded, is not a spike, does not enter the statistics, and the
    update passes through scaled by the current :math:`s_t` (a guard should refuse it). The
    factor is float32, cast to each leaf's dtype; integer, bool and ``None`` leaves pass
    through.

    Put it after the optimizer so it scales the step (a cooldown of the learning rate), or
    before it to scale the gradient.

    Args:
      z_thresh: the z-score above which a norm is a spike, ``> 0``; a number or a schedule.
      factor: :math:`f \\in [0, 1]`, the factor on the spike step; a number or a schedule.
      recovery_steps: :math:`R \\ge 0`, the steps the cosine ramp back to 1 takes.
      alpha: the EMA weight of the past, in ``(0, 1)``.
      warmup_steps: finite norms to collect before detecting, ``>= 1``.
      axis_name: inside ``shard_map``/``pmap``, the mesh axis name(s) to reduce the norm over,
        so every device takes the same decision.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`CooldownOnSpikeState`.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> tx = gs.cooldown_on_spike(warmup_steps=4, recovery_steps=2, factor=0.1)
      >>> state = tx.init(jnp.zeros(1))
      >>> for g in [1.0, 1.1, 0.9, 1.0, 50.0, 1.0, 1.0]:
      ...     u, state = tx.update(jnp.array([g]), state)
      ...     print(bool(state.spike), round(float(state.scale), 2))
      False 1.0
      False 1.0
      False 1.0
      False 1.0
      True 0.1
      False 0.55
      False 1.0

    References:
      Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
      <https://arxiv.org/abs/2504.02507>`_, 2025 (EMA z-score detection); Loshchilov and Hutter,
      `SGDR: Stochastic Gradient Descent with Warm Restarts
      <https://arxiv.org/abs/1608.03983>`_, ICLR 2017 (cosine ramp).
    """
    check_scalar("z_thresh", z_thresh, lower_inclusive=False)
    check_scalar("factor", factor, upper=1.0)
    check_int("recovery_steps", recovery_steps, lower=0)
    check_scalar(
        "alpha",
        alpha,
        lower_inclusive=False,
        upper=1.0,
        upper_inclusive=False,
        allow_schedule=False,
    )
    check_int("warmup_steps", warmup_steps, lower=1)
    check_axis_name(axis_name)

    def init_fn(params: Any) -> CooldownOnSpikeState:
        del params
        return CooldownOnSpikeState(
            count=zero_count(),
            norm=zero_scalar(),
            z=zero_scalar(),
            scale=jnp.ones([], jnp.float32),
            spike=jnp.array(False),
            spikes=zero_count(),
            steps_since_spike=jnp.asarray(NEVER, jnp.int32),
            mean=zero_scalar(),
            var=zero_scalar(),
            samples=zero_count(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        threshold = resolve(z_thresh, state.count)
        # A traced factor out of [0, 1] must not reverse or amplify the updates.
        low = jnp.minimum(nonnegative(resolve(factor, state.count)), 1.0)
        weight = resolve(alpha, state.count)
        ramp = resolve(recovery_steps, state.count)
        # Saturated, not Inf, when a finite float64 norm exceeds the float32 range.
        norm = as_float32(global_norm(updates, axis_name=axis_name))
        finite = jnp.isfinite(norm)
        warm = state.samples >= resolve(warmup_steps, state.count, jnp.int32)

        std = safe_sqrt(state.var)
        z = jnp.where(finite & warm, (norm - state.mean) / (std + Z_SCORE_EPS), 0.0)
        spike = finite & warm & (z > threshold)

        # Exact mean and variance over the warm-up, then EMAs fed the norm, capped on a
        # spike so that one spike does not inflate them.
        moments = running_moments(
            Moments(state.mean, state.var),
            state.samples,
            norm,
            warming=~warm,
            ema_input=jnp.where(spike, state.mean + threshold * std, norm),
            weight=weight,
            rest=1 - weight,
            form="incremental",
        )
        mean, var = moments
        since = jnp.where(spike, 0, safe_increment(state.steps_since_spike))
        progress = since.astype(jnp.float32) / jnp.where(ramp > 0, ramp, 1.0)
        cosine = (1 - jnp.cos(math.pi * jnp.minimum(progress, 1.0))) / 2
        # R = 0 still applies f on the spike step itself.
        active = since.astype(jnp.float32) < jnp.maximum(ramp, 1.0)
        scale = jnp.where(active, low + (1 - low) * cosine, 1.0)
        scale = scale.astype(jnp.float32)

        new_state = CooldownOnSpikeState(
            count=safe_increment(state.count),
            norm=norm,
            z=z.astype(jnp.float32),
            scale=scale,
            spike=spike,
            spikes=jnp.where(spike, safe_increment(state.spikes), state.spikes),
            steps_since_spike=since.astype(jnp.int32),
            mean=mean.astype(jnp.float32),
            var=var.astype(jnp.float32),
            samples=jnp.where(finite, safe_increment(state.samples), state.samples),
        )
        return scale_tree(updates, scale), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = ["CooldownOnSpikeState", "DecayState", "cooldown_on_spike", "decay"]
