"""Guards that refuse bad steps: non-finite steps, loss or norm spikes, loss-scale overflows.

Each guard wraps an inner transform (usually the whole optimizer). On a *refused* step the
emitted update is zeros (so ``optax.apply_updates`` leaves the parameters as they were) and the
inner state is kept bit-for-bit as it was, so the optimizer's moments, counters and schedules do
not advance. Nothing non-finite reaches the parameters: whatever else a guard checks, it also
refuses a step whose incoming gradient or loss (extra arg ``value``) is not finite, or whose
squared gradient norm overflows, which keeps the usual optimizers' state and update finite
(see :func:`skip_nonfinite` for which); with ``check="full"`` it also refuses a non-finite
inner output or new inner state, whatever the optimizer.

What a guard checks (``check=``):

* ``"gradient"`` (the default of :func:`skip_nonfinite` and :func:`dynamic_loss_scale`): the
  step is decided before ``inner`` runs, from the loss and one reduction over the incoming
  gradient, :math:`\\sum_j (2^{-64} g_j)^2 < 2^{-128}\\,\\text{max}`, true exactly when every
  entry is finite and the squared norm :math:`\\|g\\|^2` is below the dtype's largest value
  (float32 for float16/bfloat16/float32 gradients). The scaled form keeps the sum itself from
  overflowing and keeps XLA from sharing it with the optimizer's own ``g * g`` (which would
  force that product into a buffer of its own). A gradient like that keeps the state and the
  update of the usual optimizers finite; see :func:`skip_nonfinite` for which ones.
* ``"full"`` (and :func:`skip_on_spike`): ``inner`` always runs, and the step is also refused
  when its output update has a NaN/Inf, or when its new state turns a finite entry into
  NaN/Inf. This covers any optimizer, at the price of reading the new state once more and
  keeping the old one until the choice is made.

How a step is refused: with ``check="gradient"`` the verdict exists before ``inner`` runs, and
``lax.cond`` runs ``inner`` only on an accepted step (a refused one returns zeros and the old
state untouched). Of the two forms, this one moves less data in the optimized HLO of a
donated Adam step on XLA:CPU: with ``jnp.where`` between the new and the old state, XLA
recomputes the new moments inside the parameters' update (it has no multi-output fusion there)
and so copies every donated state buffer to keep the old values alive, while the ``cond``
costs one tree-sized buffer (the update it hands out of its branch); ``benchmarks/step.py``
counts the passes. On a GPU the ``cond`` reads its predicate before it launches a branch.
Under ``vmap`` the ``cond`` becomes a select. With
``check="full"`` the verdict depends on ``inner``'s output, so ``inner`` runs first and
``jnp.where`` picks its result or the old state (a select copies bits).

Every guard's state records ``skipped`` (this step was refused), ``reason`` (an index into
:data:`SKIP_REASONS`; 0 when accepted; :func:`skip_reason` gives its name),
``consecutive_skips`` and ``total_skips`` (int32, saturating), which :func:`gradsafe.metrics`
reports. These describe the last step, refused or not. On a refused step the figures of the
transforms *inside* the guard (a clipper's ``norm``, ``scale``...) are those of the last
accepted step, because their state is kept bit-for-bit: log them together with ``skipped``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradsafe._metrics import metrics, register_stats
from gradsafe._numerics import (
    AxisName,
    abs_sq,
    accumulation_dtype,
    any_nonfinite,
    check_axis_name,
    check_int,
    check_scalar,
    check_transform,
    cond,
    global_norm,
    is_float_leaf,
    is_traced,
    map_float_leaves,
    mean_across_devices,
    packed_tree,
    resolve,
    safe_increment,
    trace_once,
    zero_count,
    zero_scalar,
)

#: Why a guard refused a step: ``SKIP_REASONS[int(state.reason)]``. Index 0 means accepted.
SKIP_REASONS = (
    "accepted",
    "nonfinite_gradient",  # a NaN/Inf in the incoming (unscaled) gradient: loss-scale overflow
    "nonfinite_loss",  # the extra arg `value` is NaN/Inf
    "loss_spike",  # the loss is more than sigma deviations above the window mean
    "norm_spike",  # the gradient norm is more than sigma deviations above the window mean
    "nonfinite_update",  # the inner transform's output has a NaN/Inf
    "nonfinite_state",  # the inner transform's new state turned a finite entry into NaN/Inf
    "gradient_overflow",  # finite entries whose squared norm overflows (check="gradient")
)
ACCEPTED, NONFINITE_GRADIENT, NONFINITE_LOSS, LOSS_SPIKE, NORM_SPIKE = range(5)
NONFINITE_UPDATE, NONFINITE_STATE, GRADIENT_OVERFLOW = 5, 6, 7

#: The checks a guard can make (see the module notes).
CHECKS = ("gradient", "full")

_WATCHABLE = ("loss", "norm")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_inner(inner: Any) -> optax.GradientTransformationExtraArgs:
    check_transform("inner", inner)
    return optax.with_extra_args_support(inner)


def _check_check(check: Any) -> str:
    if not isinstance(check, str) or check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    return check


# --------------------------------------------------------------------------------------------
# The refusal machinery shared by every guard
# --------------------------------------------------------------------------------------------


def _is_gradsafe_state(node: Any) -> bool:
    return (
        isinstance(node, tuple)
        and hasattr(node, "_fields")
        and (type(node).__module__.startswith("gradsafe."))
    )


def _without_observations(state: Any) -> Any:
    """``state`` with the scalar float fields of gradsafe states set to None.

    A gradsafe transform's scalar fields are its observations and running statistics (a
    ``norm`` may legitimately be Inf for a huge finite gradient); each transform keeps its own
    dynamics finite. What remains are per-parameter buffers and the dynamics of foreign
    optimizers (moments, accumulators), which the full check protects. The rule looks at the
    state's type and shape only, not at what :func:`gradsafe.metrics` reports.
    """

    def strip(node: Any) -> Any:
        if not _is_gradsafe_state(node):
            return node
        values = []
        for field in node._fields:
            value = getattr(node, field)
            scalar = is_float_leaf(value) and jnp.ndim(value) == 0
            values.append(None if scalar else _without_observations(value))
        return type(node)(*values)

    return jax.tree.map(strip, state, is_leaf=_is_gradsafe_state)


def _went_nonfinite(old: Any, new: Any, axis_name: AxisName) -> jax.Array:
    """Whether an entry that was finite in ``old`` is NaN or Inf in ``new``, on any device.

    Entries that were already non-finite (sentinels such as an Inf "no bound yet") and the
    scalar fields of gradsafe states are ignored (see :func:`_without_observations`).
    """
    old, new = _without_observations(old), _without_observations(new)
    pairs = [
        (a, b)
        for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new), strict=True)
        if is_float_leaf(a) and is_float_leaf(b) and jnp.shape(a) == jnp.shape(b)
    ]
    return any_nonfinite([jnp.where(jnp.isfinite(a), b, 0) for a, b in pairs], axis_name)


def _loss_of(extra_args: dict[str, Any], axis_name: AxisName) -> jax.Array | None:
    """The scalar loss (extra arg ``value``) in float32, averaged across devices, or None."""
    value = extra_args.get("value")
    if value is None:
        return None
    loss = jnp.asarray(value)
    if loss.size != 1:
        raise ValueError(f"value must be the scalar loss, got an array of shape {loss.shape}")
    return mean_across_devices(loss.reshape(()).astype(jnp.float32), axis_name)


def _select(accept: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``accept`` else ``old``, leaf by leaf (bits of the chosen side are kept)."""

    def pick(a: Any, b: Any) -> Any:
        if not hasattr(a, "dtype") or a.dtype == jax.dtypes.float0:
            return a
        return jnp.where(accept, a, jnp.asarray(b, a.dtype))

    return jax.tree.map(pick, new, old)


def _zeros_unless(accept: jax.Array, updates: Any) -> Any:
    """``updates`` where ``accept``, else zeros of the same structure and dtypes."""

    def pick(u: Any) -> Any:
        if not hasattr(u, "dtype") or u.dtype == jax.dtypes.float0:
            return u
        return jnp.where(accept, u, jnp.zeros_like(u))

    return jax.tree.map(pick, updates)


class _Outcome(NamedTuple):
    updates: Any
    inner_state: Any
    reason: jax.Array
    skipped: jax.Array
    consecutive_skips: jax.Array
    total_skips: jax.Array


def _gradient_is_bad(updates: Any, axis_name: AxisName) -> jax.Array:
    """Whether the gradient has a NaN/Inf entry or a squared norm that overflows, on any device.

    One reduction, :math:`\\sum_j (c\\,g_j)^2` with :math:`c = 2^{-64}` in the accumulation
    dtype, compared with :math:`c^2` times the dtype's largest value: the scaled sum cannot
    overflow for finite entries (it saturates to Inf only when the true sum is far beyond the
    limit, which also refuses), NaN and Inf propagate, and the scaled product is not the
    optimizer's ``g * g``, so XLA does not merge the two and need not store the squares.
    Entries below about ``1e-3 * 2**-64 * max`` lose their (negligible) share to underflow.
    """
    leaves, dtype, reduce = packed_tree(updates, axis_name)
    if not leaves:
        return jnp.array(False)
    factor = 2.0**-64
    total = reduce(
        [jnp.sum(abs_sq(x.astype(accumulation_dtype(x.dtype)) * factor)) for x in leaves], "sum"
    )
    limit = jnp.asarray(float(jnp.finfo(dtype).max) * factor * factor, dtype)
    return ~(total < limit)


def _varying(shape: Any) -> tuple[str, ...]:
    """The manual mesh axes (``shard_map``) along which an ``eval_shape`` leaf varies."""
    manual = getattr(shape, "manual_axis_type", None)
    return tuple(sorted(getattr(manual, "varying", ())))


def _as_shape(x: Any, shape: Any) -> Any:
    """``x`` with the dtype of ``shape`` and varying along the same ``shard_map`` axes, so the
    two branches of a ``lax.cond`` have equal types."""
    if shape.dtype == jax.dtypes.float0:
        return np.zeros(shape.shape, jax.dtypes.float0)
    x = jnp.asarray(x, shape.dtype)
    missing = tuple(a for a in _varying(shape) if a not in _varying(jax.typeof(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _zeros_of(shape: Any) -> jax.Array:
    """Zeros of one ``eval_shape`` leaf, sharded like it under an explicit-sharding mesh."""
    sharding = getattr(shape, "sharding", None)
    if any(entry is not None for entry in getattr(sharding, "spec", None) or ()):
        return jnp.zeros(shape.shape, shape.dtype, out_sharding=sharding)
    return jnp.zeros(shape.shape, shape.dtype)


def _zeros_like_shape(shape: Any) -> Any:
    """Zeros with the structure, shapes, dtypes, shardings and varying axes of an
    ``eval_shape`` result."""
    return jax.tree.map(lambda s: _as_shape(_zeros_of(s), s), shape)


def _guarded_update(
    inner: optax.GradientTransformationExtraArgs,
    updates: Any,
    state: Any,
    params: Any,
    extra_args: dict[str, Any],
    reason: jax.Array,
    axis_name: AxisName,
    check: str = "full",
) -> _Outcome:
    """Run ``inner`` and accept its step only if ``reason`` is ACCEPTED (and, with
    ``check="full"``, its output and new state are finite).

    ``reason`` is the guard's own verdict, already the same on every device. ``state`` is the
    guard's state (it has ``inner_state``, ``consecutive_skips``, ``total_skips``). With
    ``check="gradient"`` the verdict must already cover the gradient (:func:`_gradient_is_bad`
    with the code NONFINITE_GRADIENT); a refused step then tells a NaN/Inf entry from an
    overflowing squared norm (GRADIENT_OVERFLOW), a cost paid on refused steps only.
    """
    if check == "gradient":
        accept = reason == ACCEPTED

        def run() -> tuple[Any, Any, jax.Array]:
            out, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
            return out, new_inner, reason

        run, shapes = trace_once(run, accept)

        def refuse() -> tuple[Any, Any, jax.Array]:
            shape = shapes()
            overflow = (reason == NONFINITE_GRADIENT) & ~any_nonfinite(updates, axis_name)
            old = jax.tree.map(_as_shape, state.inner_state, shape[1])
            refined = _as_shape(jnp.where(overflow, GRADIENT_OVERFLOW, reason), shape[2])
            return _zeros_like_shape(shape[0]), old, refined

        out, new_inner, reason = cond(accept, run, refuse)
        reason = reason.astype(jnp.int32)
    else:
        out, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        reason = jnp.where(
            reason != ACCEPTED,
            reason,
            jnp.where(
                any_nonfinite(out, axis_name),
                NONFINITE_UPDATE,
                jnp.where(
                    _went_nonfinite(state.inner_state, new_inner, axis_name), NONFINITE_STATE, 0
                ),
            ),
        ).astype(jnp.int32)
        accept = reason == ACCEPTED
        out = _zeros_unless(accept, out)
        new_inner = _select(accept, new_inner, state.inner_state)
    skipped = reason != ACCEPTED
    return _Outcome(
        updates=out,
        inner_state=new_inner,
        reason=reason,
        skipped=skipped,
        consecutive_skips=jnp.where(skipped, safe_increment(state.consecutive_skips), 0),
        total_skips=jnp.where(skipped, safe_increment(state.total_skips), state.total_skips),
    )


def _first_reason(*pairs: tuple[jax.Array, int]) -> jax.Array:
    """The code of the first set flag in ``(flag, code)`` pairs, ACCEPTED when none is set."""
    reason = jnp.asarray(ACCEPTED, jnp.int32)
    for flag, code in reversed(pairs):
        reason = jnp.where(flag, jnp.int32(code), reason)
    return reason


def _initial_counters() -> dict[str, jax.Array]:
    return {
        "skipped": jnp.array(False),
        "reason": zero_count(),
        "consecutive_skips": zero_count(),
        "total_skips": zero_count(),
    }


# --------------------------------------------------------------------------------------------
# skip_nonfinite
# --------------------------------------------------------------------------------------------


@register_stats("skip_nonfinite", "skipped", "reason", "consecutive_skips", "total_skips")
class SkipNonfiniteState(NamedTuple):
    """State of :func:`skip_nonfinite`.

    Attributes:
      skipped: whether the last step was refused.
      reason: why (index into :data:`SKIP_REASONS`; 0 when accepted).
      consecutive_skips: refusals in a row up to the last step (int32, saturating).
      total_skips: refusals since ``init`` (int32, saturating).
      inner_state: the wrapped transform's state, unchanged by refused steps.
    """

    skipped: jax.Array
    reason: jax.Array
    consecutive_skips: jax.Array
    total_skips: jax.Array
    inner_state: Any


def skip_nonfinite(
    inner: optax.GradientTransformation,
    *,
    check: str = "gradient",
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Refuse every step whose gradient or loss is not finite (or, optionally, whose update or
    new optimizer state is not).

    With ``check="gradient"`` (the default) a step is refused, before ``inner`` runs, when

    1. the incoming gradient has a NaN or Inf (reason ``"nonfinite_gradient"``), or its
       entries are finite but its squared norm :math:`\\|g\\|^2` overflows the accumulation
       dtype (float32 for float16/bfloat16/float32 leaves; ``"gradient_overflow"``);
    2. the loss, when passed as the extra arg ``value``, is NaN or Inf (``"nonfinite_loss"``).

    This is one reduction over the gradient, and ``lax.cond`` then runs ``inner`` only on
    accepted steps. It keeps every optimizer whose update and state are finite whenever the
    gradient is finite with a finite squared norm: Optax's ``sgd`` (with momentum or
    Nesterov), ``adam``/``adamw``, ``rmsprop``, ``adagrad`` and ``lion``,
    and gradsafe's clippers and update limit in front of or behind them, with
    float32 (or wider) optimizer state, finite hyperparameters and ``eps > 0`` where the
    optimizer divides. (An element-wise second moment :math:`(1-\\beta_2) g^2 + \\beta_2 v`
    stays below :math:`\\max(\\|g\\|^2, v)`; a momentum :math:`\\sum \\beta^k g` below
    :math:`\\|g\\|/(1-\\beta)`; an Adagrad sum of squares grows by at most :math:`\\|g\\|^2` per
    step, so it could reach Inf only after about :math:`3 \\cdot 10^{38} / \\|g\\|^2` steps, and
    then its update is :math:`g/\\sqrt{\\infty} = 0`.) It does not cover optimizers that can
    produce NaN/Inf from a finite gradient: ``eps=0`` with a zero gradient, float16
    optimizer state (:math:`g^2` overflows at :math:`|g| > 256`), a learning rate so large
    that ``lr * update`` overflows, or a custom transform. For those use ``check="full"``,
    which runs ``inner`` every step and also refuses a step when

    3. ``inner``'s output update has a NaN or Inf (``"nonfinite_update"``);
    4. ``inner``'s new state turns an entry that was finite into NaN or Inf
       (``"nonfinite_state"``; for example Adam's second moment overflowing on a huge
       finite gradient). The scalar fields of gradsafe states (a recorded ``norm``, a
       running statistic) are not checked: they record what was seen and may legitimately
       be Inf.

    A refused step emits zeros and keeps ``inner``'s state bit-identical; an accepted step
    emits what ``inner`` emits (with ``check="gradient"`` computed inside ``lax.cond``, so
    equal up to XLA's rounding of the fused kernels). ``"full"`` costs far more: in
    ``benchmarks/step.py`` (Adam, XLA:CPU) it moves about 32 tree-sized passes against 13-14
    for ``"gradient"`` and 10 for the bare step. With ``axis_name`` (inside
    ``shard_map``/``pmap``) the checks are combined across devices, so every device refuses
    together.

    Differences from the reference:
      ``optax.apply_if_finite(inner, max_consecutive_errors)`` checks only the incoming
      gradient and, after ``max_consecutive_errors`` refusals in a row, applies the NaN
      update (the parameters become NaN). This guard never gives up, also checks the loss and
      the squared norm (with ``check="full"`` the inner output and state too), does not run
      ``inner`` on a refused step with ``check="gradient"``, and counts refusals the same way
      (``consecutive_skips`` ~ ``notfinite_count``, ``total_skips`` ~ ``total_notfinite``).

    Args:
      inner: the transform to guard, usually the whole optimizer.
      check: ``"gradient"`` (decide from the gradient and the loss) or ``"full"`` (also
        check ``inner``'s update and new state).
      axis_name: mesh axis name(s) over which all devices must refuse together.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`SkipNonfiniteState`.

    Example:
      >>> import jax.numpy as jnp, optax, gradsafe as gs
      >>> tx = gs.skip_nonfinite(optax.sgd(0.1))
      >>> state = tx.init(jnp.zeros(2))
      >>> updates, state = tx.update(jnp.array([1.0, jnp.nan]), state)
      >>> updates, bool(state.skipped), gs.SKIP_REASONS[int(state.reason)]
      (Array([0., 0.], dtype=float32), True, 'nonfinite_gradient')
      >>> updates, state = tx.update(jnp.array([1.0, 2.0]), state)
      >>> updates, int(state.total_skips), int(state.consecutive_skips)
      (Array([-0.1, -0.2], dtype=float32), 1, 0)

    References:
      Micikevicius et al., `Mixed Precision Training <https://arxiv.org/abs/1710.03740>`_,
      ICLR 2018 (skipping steps whose gradients overflow).
    """
    inner = _check_inner(inner)
    check = _check_check(check)
    check_axis_name(axis_name)
    _gradient_test = _gradient_is_bad if check == "gradient" else any_nonfinite

    def init_fn(params: Any) -> SkipNonfiniteState:
        return SkipNonfiniteState(**_initial_counters(), inner_state=inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        loss = _loss_of(extra_args, axis_name)
        loss_bad = jnp.array(False) if loss is None else ~jnp.isfinite(loss)
        gradient_bad = _gradient_test(updates, axis_name)
        reason = _first_reason((gradient_bad, NONFINITE_GRADIENT), (loss_bad, NONFINITE_LOSS))
        outcome = _guarded_update(
            inner, updates, state, params, extra_args, reason, axis_name, check
        )
        new_state = SkipNonfiniteState(
            skipped=outcome.skipped,
            reason=outcome.reason,
            consecutive_skips=outcome.consecutive_skips,
            total_skips=outcome.total_skips,
            inner_state=outcome.inner_state,
        )
        return outcome.updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# skip_on_spike
# --------------------------------------------------------------------------------------------


@register_stats(
    "skip_on_spike",
    "skipped",
    "reason",
    "consecutive_skips",
    "total_skips",
    "spike_skips",
    "norm",
    "loss",
    "norm_mean",
    "norm_std",
    "loss_mean",
    "loss_std",
)
class SkipOnSpikeState(NamedTuple):
    """State of :func:`skip_on_spike`.

    Attributes:
      skipped, reason, consecutive_skips, total_skips: as in :class:`SkipNonfiniteState`.
      spike_skips: refusals as a spike in a row (int32); a refusal of a non-finite value
        neither counts nor resets it. After ``max_consecutive_skips`` of them a spike is taken
        as a new level.
      norm: the global norm of the last incoming gradient (float32).
      loss: the last loss (extra arg ``value``), NaN when none was passed.
      norm_mean, norm_std, loss_mean, loss_std: the window statistics the last step was compared
        with (0 while the window is empty; the deviation is the sample one, ``ddof=1``).
      norm_window, loss_window: the last ``window`` accepted values, oldest first, right-aligned.
      norm_count, loss_count: how many entries of each window are filled (int32, ``<= window``).
      inner_state: the wrapped transform's state, unchanged by refused steps.
    """

    skipped: jax.Array
    reason: jax.Array
    consecutive_skips: jax.Array
    total_skips: jax.Array
    spike_skips: jax.Array
    norm: jax.Array
    loss: jax.Array
    norm_mean: jax.Array
    norm_std: jax.Array
    loss_mean: jax.Array
    loss_std: jax.Array
    norm_window: jax.Array
    loss_window: jax.Array
    norm_count: jax.Array
    loss_count: jax.Array
    inner_state: Any


#: The largest gradient norm whose square is finite in float32 (about 1.8e19).
_NORM_LIMIT = float(np.sqrt(np.finfo(np.float32).max))


def _window_stats(window: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and sample deviation (ddof=1) of the last ``count`` entries of ``window``."""
    size = window.shape[0]
    valid = jnp.arange(size) >= size - count
    n = count.astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, window, 0)) / jnp.maximum(n, 1)
    squares = jnp.where(valid, jnp.square(window - mean), 0)
    std = jnp.sqrt(jnp.sum(squares) / jnp.maximum(n - 1, 1))
    return mean, std


def _push(window: jax.Array, count: jax.Array, value: jax.Array, keep: jax.Array):
    """Append ``value`` to the right of ``window`` (dropping the oldest) where ``keep``."""
    shifted = jnp.concatenate([window[1:], value.reshape(1)])
    size = window.shape[0]
    return (
        jnp.where(keep, shifted, window),
        jnp.where(keep, jnp.minimum(count + 1, size), count).astype(jnp.int32),
    )


def _spike_run(run: jax.Array, reason: jax.Array) -> jax.Array:
    """Refusals as a spike in a row after a step refused or accepted for ``reason``: one more
    after a spike, 0 after an accepted step, unchanged after a non-finite refusal."""
    spike = (reason == LOSS_SPIKE) | (reason == NORM_SPIKE)
    return jnp.where(spike, safe_increment(run), jnp.where(reason == ACCEPTED, 0, run))


def _restart(window: jax.Array, count: jax.Array, value: jax.Array, where: jax.Array):
    """Where ``where``: a window holding ``value`` alone (count 1, or 0 if it is not finite)."""
    fresh = jnp.zeros_like(window).at[-1].set(value)
    return (
        jnp.where(where, fresh, window),
        jnp.where(where, jnp.isfinite(value).astype(jnp.int32), count).astype(jnp.int32),
    )


def skip_on_spike(
    inner: optax.GradientTransformation,
    *,
    sigma: float = 6.0,
    window: int = 128,
    min_history: int = 64,
    watch: Sequence[str] = ("loss", "norm"),
    record_refused: bool = False,
    max_consecutive_skips: int | None = 3,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Refuse a step whose loss or gradient norm spikes above its recent history.

    For each watched quantity :math:`x` (the loss, passed as the extra arg ``value``, and/or
    the global L2 norm of the incoming gradient), with :math:`\\mu` and :math:`\\sigma_x` the
    mean and sample standard deviation of the last ``window`` accepted steps' values, the step
    is refused when the window holds at least ``min_history`` values and

    .. math:: x - \\mu > \\text{sigma} \\cdot \\sigma_x

    (one-sided: a drop in loss is never a spike). A refused step emits zeros and keeps the
    inner state bit-identical; its value does not enter the window. Non-finite values never
    enter the window: a NaN/Inf gradient or loss is refused as by :func:`skip_nonfinite`, as is
    an inner output or new inner state that is not finite; a finite gradient whose squared
    norm overflows float32 (norm above about ``1.8e19``) is a norm spike even without history,
    and its norm does not enter the window either. Without ``value`` the guard watches the
    norm alone (if ``watch`` is ``("loss",)`` alone, calling ``update`` without ``value``
    raises ``ValueError``).

    With ``axis_name`` the loss is averaged and the norm reduced across devices, so every
    device keeps the same window and takes the same decision.

    A spike is brief; a lasting jump of the loss or the norm is a new level, and refusing it
    would freeze training for good (refused values never enter the window, so the statistics
    would never move). So after ``max_consecutive_skips`` refusals as a spike in a row
    (refusals of non-finite values neither count nor break the run), the next step that is
    refused only as a spike is accepted instead, and the statistics are re-based on
    it: both windows restart from that step's values, and spikes are refused again once they
    hold ``min_history`` values. The default bound is short because a refusal undoes
    nothing: the loss of step :math:`t` is measured at the parameters that step :math:`t - 1`
    made, so when that step raised the loss for good, each refusal only holds the parameters
    where it left them and delays the recovery, while a bad batch spikes once. Measured with
    ``benchmarks/skip_on_spike_bounds.py`` (6 seeds per learning rate, 288 runs per bound,
    ``benchmarks/results/skip_on_spike_bounds/``): 48 runs diverged with the bound of 3, 47
    with 4, 50 with 8 and 101 without the guard; against rare spikes every bound kept all runs
    stable. A NaN or Inf in the gradient or the loss is never accepted
    this way (a finite gradient whose norm overflows float32 counts as a spike), and the
    inner update and new state are still checked as by :func:`skip_nonfinite`. With
    ``max_consecutive_skips=None`` the guard refuses a new level until the caller intervenes
    (the behaviour before this parameter existed); ``record_refused=True`` lets refused
    finite values into the window instead (as OLMo-core does), so the window follows a new
    level after a while.

    Differences from the reference:
      OLMo-core's ``SkipStepOptimizer`` (``rolling_interval_length=128, sigma_factor=6``, the
      defaults here) records every step's loss and norm, refused or not, and a NaN in its
      window turns every later comparison False. Here refused values stay out of the window
      (``record_refused=True`` restores OLMo's behaviour for finite values) and non-finite
      values never enter it. ``min_history`` counts the values in the window before the
      current step.

    Args:
      inner: the transform to guard, usually the whole optimizer.
      sigma: how many standard deviations above the mean is a spike, ``> 0``.
      window: how many accepted steps the statistics cover, an integer ``>= 2``.
      min_history: refuse nothing until the window holds this many values,
        an integer in ``[2, window]``.
      watch: which of ``"loss"`` and ``"norm"`` can trigger a refusal.
      record_refused: whether refused (finite) values also enter the window.
      max_consecutive_skips: refusals as a spike in a row after which a spike is taken as a
        new level (accepted, statistics re-based), an integer ``>= 1``, or None to refuse it
        forever.
      axis_name: mesh axis name(s) over which all devices must refuse together.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`SkipOnSpikeState`.

    Example:
      >>> import jax.numpy as jnp, optax, gradsafe as gs
      >>> tx = gs.skip_on_spike(optax.sgd(0.1), window=4, min_history=2)
      >>> state = tx.init(jnp.zeros(1))
      >>> for loss in [1.0, 1.1, 0.9, 1.0]:
      ...     _, state = tx.update(jnp.ones(1), state, value=jnp.array(loss))
      >>> updates, state = tx.update(jnp.ones(1), state, value=jnp.array(9.0))
      >>> updates, gs.SKIP_REASONS[int(state.reason)], round(float(state.loss_mean), 3)
      (Array([0.], dtype=float32), 'loss_spike', 1.0)

      A new level is accepted after ``max_consecutive_skips`` refusals:

      >>> tx = gs.skip_on_spike(optax.sgd(0.1), window=4, min_history=2, max_consecutive_skips=2)
      >>> state = tx.init(jnp.zeros(1))
      >>> for loss in [1.0, 1.1, 0.9, 1.0, 9.0, 9.1, 9.0]:
      ...     _, state = tx.update(jnp.ones(1), state, value=jnp.array(loss))
      ...     print(bool(state.skipped), int(state.loss_count))
      False 1
      False 2
      False 3
      False 4
      True 4
      True 4
      False 1

    References:
      Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
      <https://arxiv.org/abs/2204.02311>`_, 2022 (loss spikes); Team OLMo, `2 OLMo 2 Furious
      <https://arxiv.org/abs/2501.00656>`_, 2025 (skipping steps whose loss or gradient norm is
      6 deviations above the last 128 steps).
    """
    inner = _check_inner(inner)
    check_scalar("sigma", sigma, lower=0.0, lower_inclusive=False, allow_schedule=False)
    check_int("window", window, lower=2)
    check_int("min_history", min_history, lower=2, upper=window)
    if isinstance(watch, str):
        watch = (watch,)
    watch = tuple(watch) if isinstance(watch, (tuple, list)) else watch
    if not isinstance(watch, tuple) or not watch or any(w not in _WATCHABLE for w in watch):
        raise ValueError(f"watch must be a non-empty subset of {_WATCHABLE}, got {watch!r}")
    check_int("max_consecutive_skips", max_consecutive_skips, lower=1, allow_none=True)
    check_axis_name(axis_name)
    record_refused = bool(record_refused)

    def init_fn(params: Any) -> SkipOnSpikeState:
        return SkipOnSpikeState(
            **_initial_counters(),
            spike_skips=zero_count(),
            norm=zero_scalar(),
            loss=jnp.full([], jnp.nan, jnp.float32),
            norm_mean=zero_scalar(),
            norm_std=zero_scalar(),
            loss_mean=zero_scalar(),
            loss_std=zero_scalar(),
            norm_window=jnp.zeros([window], jnp.float32),
            loss_window=jnp.zeros([window], jnp.float32),
            norm_count=zero_count(),
            loss_count=zero_count(),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        loss = _loss_of(extra_args, axis_name)
        if loss is None and watch == ("loss",):
            raise ValueError(
                "skip_on_spike(watch=('loss',)) needs the loss: call update(..., value=loss)"
            )
        threshold = resolve(sigma, state.norm_count)
        norm = global_norm(updates, axis_name=axis_name).astype(jnp.float32)
        norm_mean, norm_std = _window_stats(state.norm_window, state.norm_count)
        norm_ready = state.norm_count >= min_history
        # A norm whose square overflows float32 (a NaN/Inf entry, or a huge finite gradient,
        # whose norm is finite but whose g * g would overflow an optimizer's moments) is a
        # spike whatever the history, and never enters the window.
        norm_overflows = ~(norm < _NORM_LIMIT)
        norm_spike = norm_overflows | (norm_ready & (norm - norm_mean > threshold * norm_std))
        norm_spike = norm_spike & ("norm" in watch)

        loss_mean, loss_std = _window_stats(state.loss_window, state.loss_count)
        if loss is None:
            loss = jnp.full([], jnp.nan, jnp.float32)
            loss_bad = loss_spike = jnp.array(False)
        else:
            loss_bad = ~jnp.isfinite(loss)
            loss_ready = state.loss_count >= min_history
            loss_spike = loss_ready & (loss - loss_mean > threshold * loss_std) & ("loss" in watch)

        # After max_consecutive_skips spike refusals in a row a spike is a new level: give
        # up refusing it. Only a spike: a NaN/Inf gradient entry or loss is still refused, and
        # the inner update and state are still checked; a finite gradient whose norm
        # overflows counts as a spike (refusing it forever would freeze the run).
        give_up = jnp.array(False)
        if max_consecutive_skips is not None:
            give_up = (state.spike_skips >= max_consecutive_skips) & (loss_spike | norm_spike)
            loss_spike = loss_spike & ~give_up
            norm_spike = norm_spike & ~give_up
        reason = _first_reason(
            (any_nonfinite(updates, axis_name), NONFINITE_GRADIENT),
            (loss_bad, NONFINITE_LOSS),
            (loss_spike, LOSS_SPIKE),
            (norm_spike, NORM_SPIKE),
        )
        outcome = _guarded_update(inner, updates, state, params, extra_args, reason, axis_name)
        record = jnp.array(True) if record_refused else ~outcome.skipped
        norm_window, norm_count = _push(
            state.norm_window, state.norm_count, norm, record & ~norm_overflows
        )
        loss_window, loss_count = _push(
            state.loss_window, state.loss_count, loss, record & jnp.isfinite(loss)
        )
        # Re-base the statistics on the accepted new level (only where a spike was let
        # through: an ordinary step after a run of refusals keeps the windows).
        rebase = give_up & ~outcome.skipped
        kept_norm = jnp.where(norm_overflows, jnp.float32(0), norm)
        norm_window, norm_count = _restart(norm_window, norm_count, kept_norm, rebase)
        norm_count = jnp.where(rebase & norm_overflows, 0, norm_count).astype(jnp.int32)
        loss_window, loss_count = _restart(loss_window, loss_count, loss, rebase)
        new_state = SkipOnSpikeState(
            skipped=outcome.skipped,
            reason=outcome.reason,
            consecutive_skips=outcome.consecutive_skips,
            total_skips=outcome.total_skips,
            spike_skips=_spike_run(state.spike_skips, outcome.reason),
            norm=norm,
            loss=loss,
            norm_mean=norm_mean,
            norm_std=norm_std,
            loss_mean=loss_mean,
            loss_std=loss_std,
            norm_window=norm_window,
            loss_window=loss_window,
            norm_count=norm_count,
            loss_count=loss_count,
            inner_state=outcome.inner_state,
        )
        return outcome.updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# dynamic_loss_scale
# --------------------------------------------------------------------------------------------


@register_stats(
    "dynamic_loss_scale",
    "loss_scale",
    "skipped",
    "reason",
    "consecutive_skips",
    "total_skips",
    "growth_tracker",
)
class DynamicLossScaleState(NamedTuple):
    """State of :func:`dynamic_loss_scale`.

    Attributes:
      loss_scale: the scale to multiply the next step's loss by (float32); read it with
        :func:`loss_scale`.
      growth_tracker: clean steps since the last overflow or growth (int32).
      hysteresis_left: overflows still tolerated before backing off (int32, Megatron's
        hysteresis tracker, floored at 0).
      skipped, reason, consecutive_skips, total_skips: as in :class:`SkipNonfiniteState`;
        an overflow has reason ``"nonfinite_gradient"``.
      inner_state: the wrapped transform's state, unchanged by refused steps.
    """

    loss_scale: jax.Array
    growth_tracker: jax.Array
    hysteresis_left: jax.Array
    skipped: jax.Array
    reason: jax.Array
    consecutive_skips: jax.Array
    total_skips: jax.Array
    inner_state: Any


def dynamic_loss_scale(
    inner: optax.GradientTransformation,
    *,
    init_scale: float = 2.0**15,
    growth_interval: int = 2000,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    min_scale: float = 1.0,
    hysteresis: int = 1,
    check: str = "gradient",
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Dynamic loss scaling for float16 training: unscale, refuse overflows, adapt the scale.

    The training step multiplies its loss by :math:`S` = :func:`loss_scale` ``(opt_state)``
    before differentiating (pass the *unscaled* loss as ``value`` if you pass one). The
    wrapper multiplies every gradient leaf by :math:`1/S` (in float32, cast back to the leaf's
    dtype) and hands the result to ``inner``. Then, with :math:`t` the growth tracker and
    :math:`h` the overflows left before a backoff:

    * **overflow** (the unscaled gradient has a NaN/Inf on any device): the step is refused,
      :math:`t \\leftarrow 0`, :math:`h \\leftarrow \\max(h-1, 0)`, and if :math:`h = 0`,
      :math:`S \\leftarrow \\max(S \\cdot \\text{backoff\\_factor}, \\text{min\\_scale})`;
    * **clean step**: :math:`t \\leftarrow t+1`; when :math:`t` reaches ``growth_interval``,
      :math:`t \\leftarrow 0`, :math:`h \\leftarrow` ``hysteresis``, and
      :math:`S \\leftarrow S \\cdot \\text{growth\\_factor}` if that is finite.
    * A step refused for another reason (NaN loss; with ``check="full"`` a non-finite inner
      output or state, as in :func:`skip_nonfinite`) changes neither :math:`S`, :math:`t`
      nor :math:`h`.

    ``min_scale`` and the other settings live in the closure, not in the state, so they
    survive ``jit`` and any pytree round trip. Refused steps emit zeros and keep the inner
    state bit-identical.

    Matching other libraries (same scale sequence on the same overflow pattern):

    * ``jmp.DynamicLossScale(loss_scale=S0, period=P, factor=F, min_loss_scale=M)``:
      ``init_scale=S0, growth_interval=P, growth_factor=F, backoff_factor=1/F, min_scale=M,
      hysteresis=1`` (jmp's defaults are this function's defaults: ``2**15``, 2000, 2, 1.0).
    * ``torch.amp.GradScaler(init_scale=S0, growth_factor=G, backoff_factor=B,
      growth_interval=P)``: ``init_scale=S0, growth_factor=G, backoff_factor=B,
      growth_interval=P, min_scale=0.0, hysteresis=1`` (GradScaler has no floor; its defaults
      are ``2**16``, 2.0, 0.5, 2000).
    * Megatron-LM ``DynamicGradScaler(initial_scale, min_scale, growth_factor, backoff_factor,
      growth_interval, hysteresis)``: the same names. ``hysteresis=n`` backs off from the n-th
      overflow since the last growth (or the start) on, as Megatron's code does (its docstring
      says "consecutive", but its tracker is reset only by a growth).

    Differences from the reference:
      Megatron-LM grows the scale even when the result is infinite; here (as in jmp and
      PyTorch) a growth that would overflow float32 is not taken. jmp keeps ``min_loss_scale``
      out of its pytree, so after ``jit`` it silently returns to 1.0; here it is kept.

    Args:
      inner: the transform to guard, usually the whole optimizer.
      init_scale: the first loss scale, finite, ``> 0`` and ``>= min_scale``.
      growth_interval: clean steps between growths, an integer ``>= 1``.
      growth_factor: the factor of a growth, ``>= 1``.
      backoff_factor: the factor of a backoff, in ``(0, 1]``.
      min_scale: the floor of the scale, ``>= 0`` (0: no floor, as GradScaler).
      hysteresis: overflows (since the last growth) before backing off, an integer ``>= 1``.
      check: ``"gradient"`` or ``"full"``, as in :func:`skip_nonfinite`. With
        ``"gradient"`` an unscaled gradient whose squared norm overflows counts as an
        overflow (the scale backs off).
      axis_name: mesh axis name(s) over which all devices must refuse together.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`DynamicLossScaleState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, gradsafe as gs
      >>> tx = gs.dynamic_loss_scale(optax.sgd(0.1), init_scale=1024.0, growth_interval=2)
      >>> params = jnp.array(1.0)
      >>> state = tx.init(params)
      >>> scales = []
      >>> for step in range(5):
      ...     scaled_loss = lambda p: jnp.square(p) * gs.loss_scale(state)
      ...     grads = jax.grad(scaled_loss)(params)
      ...     if step == 2:
      ...         grads = grads * jnp.inf  # an overflow
      ...     updates, state = tx.update(grads, state)
      ...     params = optax.apply_updates(params, updates)
      ...     scales.append(float(gs.loss_scale(state)))
      >>> scales
      [1024.0, 2048.0, 1024.0, 1024.0, 2048.0]

    References:
      Micikevicius et al., `Mixed Precision Training <https://arxiv.org/abs/1710.03740>`_,
      ICLR 2018; Shoeybi et al., `Megatron-LM <https://arxiv.org/abs/1909.08053>`_, 2019
      (hysteresis).
    """
    inner = _check_inner(inner)
    check_scalar("min_scale", min_scale, allow_schedule=False)
    check_scalar("init_scale", init_scale, lower=0.0, lower_inclusive=False, allow_schedule=False)
    # Under inject_hyperparams + jit both may be tracers: only numbers known now are compared.
    if (
        not is_traced(init_scale)
        and not is_traced(min_scale)
        and float(np.asarray(init_scale).reshape(())) < float(np.asarray(min_scale).reshape(()))
    ):
        raise ValueError(f"init_scale must be >= min_scale={min_scale!r}, got {init_scale!r}")
    check_int("growth_interval", growth_interval, lower=1)
    check_scalar("growth_factor", growth_factor, lower=1.0, allow_schedule=False)
    check_scalar(
        "backoff_factor", backoff_factor, lower=0.0, lower_inclusive=False, upper=1.0,
        allow_schedule=False,
    )  # fmt: skip
    check_int("hysteresis", hysteresis, lower=1)
    check = _check_check(check)
    check_axis_name(axis_name)
    _gradient_test = _gradient_is_bad if check == "gradient" else any_nonfinite

    def init_fn(params: Any) -> DynamicLossScaleState:
        return DynamicLossScaleState(
            loss_scale=resolve(init_scale, zero_count()),
            growth_tracker=zero_count(),
            hysteresis_left=jnp.asarray(hysteresis, jnp.int32),
            **_initial_counters(),
            inner_state=inner.init(params),
        )

    def unscale(x: jax.Array, inverse: jax.Array) -> jax.Array:
        acc = accumulation_dtype(x.dtype)
        return (x.astype(acc) * inverse.astype(acc)).astype(x.dtype)

    def update_fn(updates, state, params=None, **extra_args):
        scale = state.loss_scale
        inverse = jnp.float32(1) / scale
        updates = map_float_leaves(lambda x: unscale(x, inverse), updates)
        overflow = _gradient_test(updates, axis_name)
        loss = _loss_of(extra_args, axis_name)
        loss_bad = jnp.array(False) if loss is None else ~jnp.isfinite(loss)
        reason = _first_reason((overflow, NONFINITE_GRADIENT), (loss_bad, NONFINITE_LOSS))
        outcome = _guarded_update(
            inner, updates, state, params, extra_args, reason, axis_name, check
        )

        clean = ~outcome.skipped
        tracker = state.growth_tracker + 1
        grow = clean & (tracker >= growth_interval)
        grown = scale * resolve(growth_factor, state.growth_tracker)
        hysteresis_left = jnp.maximum(state.hysteresis_left - 1, 0)
        backoff = overflow & (hysteresis_left == 0)
        backed_off = jnp.maximum(
            scale * resolve(backoff_factor, tracker), resolve(min_scale, tracker)
        )
        new_scale = jnp.where(
            backoff, backed_off, jnp.where(grow & jnp.isfinite(grown), grown, scale)
        )
        new_state = DynamicLossScaleState(
            loss_scale=new_scale,
            growth_tracker=jnp.where(
                overflow | grow, 0, jnp.where(clean, tracker, state.growth_tracker)
            ).astype(jnp.int32),
            hysteresis_left=jnp.where(
                overflow, hysteresis_left, jnp.where(grow, hysteresis, state.hysteresis_left)
            ).astype(jnp.int32),
            skipped=outcome.skipped,
            reason=outcome.reason,
            consecutive_skips=outcome.consecutive_skips,
            total_skips=outcome.total_skips,
            inner_state=outcome.inner_state,
        )
        return outcome.updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def skip_reason(opt_state: Any) -> str | None:
    """The name of the reason the guard in ``opt_state`` gave for its last step, for a log.

    ``"accepted"`` or one of :data:`SKIP_REASONS`; None when ``opt_state`` holds no guard.
    Call it on a concrete state (outside ``jit``); inside ``jit`` log
    ``gs.metrics(state)["<guard>/reason"]`` and decode it later with
    ``SKIP_REASONS[reason]``. Raises ``ValueError`` if the state holds more than one guard.

    Args:
      opt_state: an optimizer state.

    Returns:
      The reason's name, or None.

    Example:
      >>> import jax.numpy as jnp, optax, gradsafe as gs
      >>> tx = gs.stabilize(optax.sgd(0.1), clip=None, limit_updates=False)
      >>> state = tx.init(jnp.zeros(2))
      >>> gs.skip_reason(state)
      'accepted'
      >>> _, state = tx.update(jnp.array([1.0, jnp.inf]), state)
      >>> gs.skip_reason(state), gs.skip_reason(optax.sgd(0.1).init(jnp.zeros(2)))
      ('nonfinite_gradient', None)
    """
    found = [v for k, v in metrics(opt_state).items() if k.endswith("/reason")]
    if len(found) > 1:
        raise ValueError(f"opt_state holds {len(found)} guards; expected at most one")
    if not found:
        return None
    return SKIP_REASONS[int(np.asarray(found[0]))]


def loss_scale(opt_state: Any) -> jax.Array:
    """The loss scale to multiply the next step's loss by: 1.0 without :func:`dynamic_loss_scale`.

    Finds the :class:`DynamicLossScaleState` anywhere inside ``opt_state`` (chains,
    :func:`gradsafe.stabilize`, flax ``nnx.Optimizer`` state); works inside ``jit``. Raises
    ``ValueError`` if the state holds more than one.

    Args:
      opt_state: an optimizer state.

    Returns:
      A float32 scalar.

    Example:
      >>> import jax.numpy as jnp, optax, gradsafe as gs
      >>> state = gs.stabilize(optax.sgd(0.1), clip=None, loss_scale=True).init(jnp.zeros(1))
      >>> float(gs.loss_scale(state)), float(gs.loss_scale(optax.sgd(0.1).init(jnp.zeros(1))))
      (32768.0, 1.0)
    """
    found = [
        value
        for key, value in metrics(opt_state).items()
        if key.startswith("dynamic_loss_scale") and key.endswith("/loss_scale")
    ]
    if len(found) > 1:
        raise ValueError(f"opt_state holds {len(found)} dynamic_loss_scale states; expected one")
    if not found:
        return jnp.ones([], jnp.float32)
    return jnp.asarray(found[0], jnp.float32)
