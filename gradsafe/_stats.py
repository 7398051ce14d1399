"""Running statistics of a scalar stream (a gradient norm): exact warm-up, then EMAs.

ZClip (:func:`gradsafe.zclip`) and :func:`gradsafe.cooldown_on_spike` both collect the first
norms exactly (Welford's running mean and population variance) and then follow them with
exponential moving averages. This module is their one implementation, with the rules both
need: a non-finite value leaves the statistics unchanged, and a huge finite value (a float32
square of 1e20 is Inf) saturates instead of turning the variance into Inf for good.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradsafe._numerics import saturate


class Moments(NamedTuple):
    """A running mean and variance (float32 scalars)."""

    mean: jax.Array
    var: jax.Array


def welford(moments: Moments, samples: jax.Array, x: jax.Array) -> Moments:
    """Welford's update: the exact mean and population variance after adding ``x`` to
    ``samples`` values.

    .. math:: \\delta = x - \\mu,\\quad \\mu' = \\mu + \\delta / k,\\quad
              \\sigma'^2 = \\sigma^2 + (\\delta (x - \\mu') - \\sigma^2) / k,\\quad k = n + 1
    """
    k = (samples + 1).astype(moments.mean.dtype)
    delta = saturate(x - moments.mean)
    mean = moments.mean + delta / k
    var = moments.var + (saturate(delta * (x - mean)) - moments.var) / k
    return Moments(mean, saturate(var))


def ema(moments: Moments, x: jax.Array, weight: jax.Array, rest: jax.Array, form: str) -> Moments:
    """Exponential moving averages with weight :math:`\\alpha` = ``weight`` on the past
    (``rest`` is :math:`1 - \\alpha`, passed separately so it can be exact).

    * ``form="zclip"`` (ZClip's package): :math:`\\mu' = \\alpha\\mu + (1-\\alpha)x`,
      :math:`\\sigma'^2 = \\alpha\\sigma^2 + (1-\\alpha)(x - \\mu')^2`.
    * ``form="incremental"`` (the incremental exponentially weighted variance):
      :math:`\\delta = x - \\mu`, :math:`\\mu' = \\mu + (1-\\alpha)\\delta`,
      :math:`\\sigma'^2 = \\alpha(\\sigma^2 + (1-\\alpha)\\delta^2)`.
    """
    if form == "zclip":
        mean = weight * moments.mean + rest * x
        var = weight * moments.var + rest * saturate(jnp.square(x - mean))
    else:
        delta = saturate(x - moments.mean)
        mean = moments.mean + rest * delta
        var = weight * (moments.var + rest * saturate(jnp.square(delta)))
    return Moments(saturate(mean), saturate(var))


def running_moments(
    moments: Moments,
    samples: jax.Array,
    x: jax.Array,
    *,
    warming: jax.Array,
    ema_input: jax.Array,
    weight: jax.Array,
    rest: jax.Array,
    form: str,
    frozen: jax.Array | bool = False,
) -> Moments:
    """One step of warm-up-then-EMA statistics, branch-free.

    While ``warming``, ``x`` joins the exact Welford statistics (``samples`` values so far);
    afterwards ``ema_input`` (``x``, or a capped value on a spike) updates the EMAs of
    :func:`ema`. A non-finite ``x``, or ``frozen`` after the warm-up, leaves them unchanged.
    """
    finite = jnp.isfinite(x)
    safe_x = jnp.where(finite, x, moments.mean)
    safe_input = jnp.where(finite, ema_input, moments.mean)
    warm = welford(moments, samples, safe_x)
    after = ema(moments, safe_input, weight, rest, form)
    keep = ~finite | (~warming & frozen)
    return Moments(
        jnp.where(keep, moments.mean, jnp.where(warming, warm.mean, after.mean)),
        jnp.where(keep, moments.var, jnp.where(warming, warm.var, after.var)),
    )


__all__ = ["Moments", "ema", "running_moments", "welford"]
