"""Regularization: L1/L2 penalties as gradient terms or as proximal steps, and Clippy.

Two ways to regularize the parameters :math:`w`:

* **Gradient terms**, placed *before* the optimizer, add the (sub)gradient of a penalty to the
  gradient: :func:`add_l2`, :func:`add_l1`, :func:`add_elastic_net`. The optimizer then sees
  the penalized gradient (for Adam this is "L2 regularization", not AdamW's decoupled decay).
* **Proximal steps**, placed *after* the optimizer, replace the step :math:`w + u` by
  :math:`\\operatorname{prox}(w + u)`: :func:`prox_l1`, :func:`prox_elastic_net`,
  :func:`prox_group_lasso`. The update they return is :math:`u' = \\operatorname{prox}(w + u)
  - w`, so ``optax.apply_updates`` lands on the proximal point, and entries (or whole leaves)
  that the operator sets to zero become **exact zeros**: a gradient term only makes them
  oscillate around zero (exact when the updates have the parameters' dtype; a bfloat16
  update of a float32 parameter can only come close). With ``optax.sgd(lr)`` before it and
  the same ``learning_rate``, this is the proximal gradient method (ISTA).

:func:`clip_update_relative` (Clippy) goes after the optimizer too: it bounds each entry of the
update relative to the size of its parameter.

Every transform here needs ``params`` and raises Optax's ``ValueError`` without them. Only
leaves where both the update and the parameter are float arrays are changed; integer, bool,
``None`` and ``MaskedNode`` leaves pass through. Arithmetic runs in float32 (float64 for float64
leaves, complex for complex ones) and every update keeps its dtype. ``mask=`` works like
``optax.masked``: a tree of bools like the params, or a function ``params -> tree of bools``
such as :func:`gradsafe.path_mask`; False leaves pass through unchanged. Under
``optax.inject_hyperparams`` list ``"mask"`` in ``static_args``, otherwise Optax calls the mask
function as a schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradsafe._checks import check_axis_name, check_scalar, require_params
from gradsafe._metrics import register_stats
from gradsafe._numerics import (
    AxisName,
    ScalarOrSchedule,
    abs_sq,
    accumulation_dtype,
    clip_factor,
    compute_dtype,
    is_float_leaf,
    leaf_norm,
    nonnegative,
    reduce_leaf_across_devices,
    resolve,
    safe_increment,
    safe_ratio,
    scale_leaf,
    zero_count,
)

# A tree of bools like the params, or a function params -> tree of bools.
Mask = Any

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _is_placeholder(x: Any) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


def _map_with_params(fn: Callable[[jax.Array, jax.Array], Any], updates: Any, params: Any) -> Any:
    """``fn(u, w)`` where the update and the parameter are float arrays; others pass through."""

    def apply(u: Any, w: Any) -> Any:
        return fn(u, w) if is_float_leaf(u) and is_float_leaf(w) else u

    return jax.tree.map(apply, updates, params, is_leaf=_is_placeholder)


def _check_mask(mask: Any) -> None:
    """Raise ``ValueError`` for masks that are surely mistakes: strings, bare bools, arrays."""
    if isinstance(mask, str):
        raise ValueError(
            f"mask must be None, a tree of bools or a function params -> tree of bools, got the"
            f" string {mask!r}; for a regular expression on paths use gs.path_mask({mask!r})"
        )
    # A bare bool or array is what optax.inject_hyperparams hands over when it has called a
    # mask function as if it were a schedule (``mask`` missing from ``static_args``).
    if isinstance(mask, (bool, jax.Array)):
        raise ValueError(
            "mask must be None, a tree of Python bools or a function params -> tree of bools,"
            f" got {mask!r}; under optax.inject_hyperparams list 'mask' in static_args"
        )


def _with_mask(tx: optax.GradientTransformationExtraArgs, mask: Mask):
    return tx if mask is None else optax.masked(tx, mask)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _resolver(
    hyperparams: tuple[ScalarOrSchedule | None, ...],
    count: jax.Array,
    post: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[Any], list[Any]]:
    """``dtype -> hyperparameter values at step count in dtype`` (float64 leaves under x64 get
    float64 values, not float32 ones cast up), each passed through ``post`` if given (e.g. a
    clamp of traced values); each dtype is resolved once."""
    cache: dict[Any, list[jax.Array | None]] = {}

    def value(h: ScalarOrSchedule | None, dtype: Any) -> jax.Array | None:
        if h is None:
            return None
        resolved = resolve(h, count, dtype)
        return resolved if post is None else post(resolved)

    def values_in(dtype: Any) -> list[jax.Array | None]:
        key = jnp.dtype(dtype)
        if key not in cache:
            cache[key] = [value(h, key) for h in hyperparams]
        return cache[key]

    return values_in


def _total(values: list[jax.Array]) -> jax.Array:
    """The float32 sum of per-leaf scalars, 0 when there are none."""
    return sum((v.astype(jnp.float32) for v in values), jnp.zeros([], jnp.float32))


# --------------------------------------------------------------------------------------------
# Gradient terms: add_l2, add_l1, add_elastic_net
# --------------------------------------------------------------------------------------------


@register_stats("add_l2", "penalty", "count")
class AddL2State(NamedTuple):
    """State of :func:`add_l2`: steps seen and the penalty :math:`\\tfrac{\\lambda}{2}\\|w\\|_2^2`
    at the parameters of the last step (float32; add it to the loss you log)."""

    count: jax.Array
    penalty: jax.Array


@register_stats("add_l1", "penalty", "count")
class AddL1State(NamedTuple):
    """State of :func:`add_l1`: steps seen and the penalty :math:`\\lambda\\|w\\|_1` at the
    parameters of the last step (float32)."""

    count: jax.Array
    penalty: jax.Array


@register_stats("add_elastic_net", "penalty", "count")
class AddElasticNetState(NamedTuple):
    """State of :func:`add_elastic_net`: steps seen and the penalty
    :math:`\\lambda_1\\|w\\|_1 + \\tfrac{\\lambda_2}{2}\\|w\\|_2^2` at the parameters of the last
    step (float32)."""

    count: jax.Array
    penalty: jax.Array


def _penalty_gradient(
    state_cls: type, l1: ScalarOrSchedule | None, l2: ScalarOrSchedule | None
) -> optax.GradientTransformationExtraArgs:
    """``g + l1 * sign(w) + l2 * w``; records ``l1 * ||w||_1 + l2 / 2 * ||w||_2^2``."""

    def init_fn(params: Any) -> Any:
        del params
        return state_cls(zero_count(), jnp.zeros([], jnp.float32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        require_params(params)
        values_in = _resolver((l1, l2), state.count)
        penalties: list[jax.Array] = []

        def add_term(g: jax.Array, w: jax.Array) -> jax.Array:
            dtype = compute_dtype(g.dtype, w.dtype)
            weights = w.astype(dtype)
            total = g.astype(dtype)
            real = accumulation_dtype(dtype)
            l1_now, l2_now = values_in(real)
            penalty = jnp.zeros([], real)
            if l1_now is not None:
                total = total + l1_now.astype(dtype) * jnp.sign(weights)
                penalty = penalty + l1_now.astype(real) * leaf_norm(weights, 1).astype(real)
            if l2_now is not None:
                total = total + l2_now.astype(dtype) * weights
                half = (l2_now / 2).astype(real)
                penalty = penalty + half * jnp.sum(abs_sq(weights)).astype(real)
            penalties.append(penalty)
            return total.astype(g.dtype)

        updates = _map_with_params(add_term, updates, params)
        return updates, state_cls(safe_increment(state.count), _total(penalties))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def add_l2(weight: ScalarOrSchedule, *, mask: Mask = None) -> optax.GradientTransformationExtraArgs:
    """Add the gradient of the L2 penalty :math:`\\tfrac{\\lambda}{2}\\|w\\|_2^2` to the updates.

    .. math:: g \\leftarrow g + \\lambda w

    Place it before the optimizer (``optax.chain(gs.add_l2(1e-4), optax.adam(1e-3))``): the
    optimizer then minimises loss + penalty ("L2 regularization"). The same numbers as
    ``optax.add_decayed_weights(weight)`` placed in the same position; for AdamW's decoupled
    weight decay, put ``optax.add_decayed_weights`` after the preconditioner instead. The state
    records the penalty at the current parameters, for logging the regularized loss.

    Args:
      weight: :math:`\\lambda \\ge 0`; a number, an array or a schedule ``step -> weight``.
      mask: a tree of bools like the params, or a function ``params -> tree of bools`` (e.g.
        ``gs.path_mask(exclude=r"bias$")``); False leaves pass through unchanged.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`AddL2State` (wrapped in
      ``optax.MaskedState`` when ``mask`` is given). Its ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> tx = gs.add_l2(0.5)
      >>> params = jnp.array([2.0, -4.0])
      >>> updates, state = tx.update(jnp.array([1.0, 1.0]), tx.init(params), params)
      >>> updates, float(state.penalty)
      (Array([ 2., -1.], dtype=float32), 5.0)

    References:
      Hoerl and Kennard, `Ridge Regression: Biased Estimation for Nonorthogonal Problems
      <https://doi.org/10.1080/00401706.1970.10488634>`_, Technometrics 1970; Krogh and Hertz,
      `A Simple Weight Decay Can Improve Generalization
      <https://papers.nips.cc/paper/563-a-simple-weight-decay-can-improve-generalization>`_,
      NeurIPS 1991.
    """
    check_scalar("weight", weight)
    _check_mask(mask)
    return _with_mask(_penalty_gradient(AddL2State, None, weight), mask)


def add_l1(weight: ScalarOrSchedule, *, mask: Mask = None) -> optax.GradientTransformationExtraArgs:
    """Add a subgradient of the L1 penalty :math:`\\lambda\\|w\\|_1` to the updates.

    .. math:: g \\leftarrow g + \\lambda \\operatorname{sign}(w)

    with :math:`\\operatorname{sign}(0) = 0` (and :math:`w/|w|` for complex entries). Place it
    before the optimizer. A gradient term pushes weights towards zero but does not make them
    exactly zero; for exact sparsity use :func:`prox_l1` after the optimizer.

    Args:
      weight: :math:`\\lambda \\ge 0`; a number, an array or a schedule.
      mask: a tree of bools like the params, or a function ``params -> tree of bools``; False
        leaves pass through unchanged.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`AddL1State`. Its
      ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> tx = gs.add_l1(0.5)
      >>> params = jnp.array([2.0, 0.0, -4.0])
      >>> updates, state = tx.update(jnp.ones(3), tx.init(params), params)
      >>> updates, float(state.penalty)
      (Array([1.5, 1. , 0.5], dtype=float32), 3.0)

    References:
      Tibshirani, `Regression Shrinkage and Selection via the Lasso
      <https://doi.org/10.1111/j.2517-6161.1996.tb02080.x>`_, JRSS B 1996.
    """
    check_scalar("weight", weight)
    _check_mask(mask)
    return _with_mask(_penalty_gradient(AddL1State, weight, None), mask)


def add_elastic_net(
    l1: ScalarOrSchedule, l2: ScalarOrSchedule, *, mask: Mask = None
) -> optax.GradientTransformationExtraArgs:
    """Add a subgradient of the elastic-net penalty to the updates.

    For the penalty :math:`\\lambda_1\\|w\\|_1 + \\tfrac{\\lambda_2}{2}\\|w\\|_2^2`:

    .. math:: g \\leftarrow g + \\lambda_1 \\operatorname{sign}(w) + \\lambda_2 w

    Both strengths are absolute (unlike :func:`prox_elastic_net`, which follows jaxopt's
    parametrization by default). Place it before the optimizer.

    Args:
      l1: :math:`\\lambda_1 \\ge 0`; a number, an array or a schedule.
      l2: :math:`\\lambda_2 \\ge 0`; a number, an array or a schedule.
      mask: a tree of bools like the params, or a function ``params -> tree of bools``; False
        leaves pass through unchanged.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`AddElasticNetState`. Its
      ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> tx = gs.add_elastic_net(0.5, 0.25)
      >>> params = jnp.array([2.0, -4.0])
      >>> tx.update(jnp.zeros(2), tx.init(params), params)[0]
      Array([ 1. , -1.5], dtype=float32)

    References:
      Zou and Hastie, `Regularization and Variable Selection via the Elastic Net
      <https://doi.org/10.1111/j.1467-9868.2005.00503.x>`_, JRSS B 2005.
    """
    check_scalar("l1", l1)
    check_scalar("l2", l2)
    _check_mask(mask)
    return _with_mask(_penalty_gradient(AddElasticNetState, l1, l2), mask)


# --------------------------------------------------------------------------------------------
# Proximal steps: prox_l1, prox_elastic_net, prox_group_lasso
# --------------------------------------------------------------------------------------------


@register_stats("prox_l1", "threshold", "zero_fraction", "count")
class ProxL1State(NamedTuple):
    """State of :func:`prox_l1`.

    Attributes:
      count: steps seen (int32, saturating).
      threshold: the soft-threshold ``learning_rate * l1reg`` in force this step (float32).
      zero_fraction: the fraction of (unmasked, float) parameter entries that are exactly zero
        after this step.
    """

    count: jax.Array
    threshold: jax.Array
    zero_fraction: jax.Array


@register_stats("prox_elastic_net", "threshold", "zero_fraction", "count")
class ProxElasticNetState(NamedTuple):
    """State of :func:`prox_elastic_net`: steps seen, the soft-threshold
    ``learning_rate * l1reg`` in force, and the fraction of parameter entries exactly zero after
    the step."""

    count: jax.Array
    threshold: jax.Array
    zero_fraction: jax.Array


@register_stats("prox_group_lasso", "threshold", "zero_fraction", "count")
class ProxGroupLassoState(NamedTuple):
    """State of :func:`prox_group_lasso`: steps seen, the block threshold
    ``learning_rate * l2reg`` in force, and the fraction of parameter entries exactly zero after
    the step (entries of leaves set to zero, plus entries already zero)."""

    count: jax.Array
    threshold: jax.Array
    zero_fraction: jax.Array


def _proximal_step(
    state_cls: type,
    threshold_fn: Callable[..., jax.Array],
    leaf_fn: Callable[[jax.Array, jax.Array, jax.Array, list[Any]], tuple[jax.Array, jax.Array]],
    learning_rate: ScalarOrSchedule,
    *hyperparams: ScalarOrSchedule,
) -> optax.GradientTransformationExtraArgs:
    """A transform returning ``prox(w + u) - w`` leaf by leaf.

    ``leaf_fn(u, w, x, hyper)`` gets the update, the parameter and ``x = w + u`` in the compute
    dtype, and the resolved hyperparameters ``(learning_rate, *hyperparams)`` in the matching
    real dtype; it returns the new update and the number of entries of ``prox(x)`` that are
    exactly zero.
    """

    def init_fn(params: Any) -> Any:
        del params
        count = zero_count()
        values = [resolve(h, count) for h in (learning_rate, *hyperparams)]
        return state_cls(count, threshold_fn(*values), jnp.zeros([], jnp.float32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        require_params(params)
        values_in = _resolver((learning_rate, *hyperparams), state.count)
        values = values_in(jnp.float32)
        zeros: list[jax.Array] = []
        sizes: list[int] = []

        def step(u: jax.Array, w: jax.Array) -> jax.Array:
            dtype = compute_dtype(u.dtype, w.dtype)
            u_wide, w_wide = u.astype(dtype), w.astype(dtype)
            hyper = values_in(accumulation_dtype(dtype))
            new_update, zero_count_ = leaf_fn(u_wide, w_wide, w_wide + u_wide, hyper)
            zeros.append(zero_count_)
            sizes.append(u.size)
            return new_update.astype(u.dtype)

        updates = _map_with_params(step, updates, params)
        total = sum(sizes)
        fraction = _total(zeros) / max(total, 1)
        return updates, state_cls(safe_increment(state.count), threshold_fn(*values), fraction)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _soft_threshold_update(
    u: jax.Array, w: jax.Array, x: jax.Array, threshold: jax.Array, shrink: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """``soft(x, t) / (1 + shrink) - w``, written so that thresholded entries give exactly
    ``-w`` and ``t = 0`` (with no shrink) gives exactly ``u``. NaN entries stay NaN. A
    negative or NaN threshold (traced) counts as 0: it must not push entries away from 0."""
    threshold = nonnegative(threshold)
    zeroed = jnp.abs(x) <= threshold  # False for NaN: NaN propagates through the other branch
    moved = u - threshold.astype(x.dtype) * jnp.sign(x)
    if shrink is not None:
        shrink = shrink.astype(x.dtype)
        # soft(x, t) / (1 + k) - w = (u - t sign(x) - k w) / (1 + k)
        moved = (moved - shrink * w) / (1 + shrink)
    return jnp.where(zeroed, -w, moved), jnp.sum(zeroed, dtype=jnp.float32)


def prox_l1(
    l1reg: ScalarOrSchedule, learning_rate: ScalarOrSchedule, *, mask: Mask = None
) -> optax.GradientTransformationExtraArgs:
    """Proximal step of the L1 penalty (soft-thresholding), placed after the optimizer.

    With :math:`x = w + u` (the point the optimizer's update :math:`u` would reach) and
    :math:`t = \\eta\\lambda` (``learning_rate * l1reg``):

    .. math:: \\operatorname{prox}(x) = \\operatorname{argmin}_y \\tfrac12\\|y - x\\|_2^2
              + t\\|y\\|_1 = \\operatorname{sign}(x)\\max(|x| - t, 0),\\qquad
              u' = \\operatorname{prox}(x) - w

    so that ``optax.apply_updates(w, u')`` is :math:`\\operatorname{prox}(w + u)`; entries with
    :math:`|x| \\le t` become exactly zero. The same numbers as jaxopt's
    ``prox_lasso(w + u, l1reg, scaling=learning_rate)``. ``optax.chain(optax.sgd(lr),
    gs.prox_l1(l1reg, lr))`` is ISTA for loss :math:`+\\,\\lambda\\|w\\|_1`; after an adaptive
    optimizer pass the learning rate you gave it. NaN entries stay NaN. Complex entries shrink
    their modulus.

    Args:
      l1reg: :math:`\\lambda \\ge 0`; a number, an array or a schedule.
      learning_rate: :math:`\\eta \\ge 0`, the optimizer's step size; a number or a schedule
        (pass the optimizer's schedule).
      mask: a tree of bools like the params, or a function ``params -> tree of bools``; False
        leaves pass through unchanged.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`ProxL1State`. Its
      ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, gradsafe as gs
      >>> tx = gs.prox_l1(l1reg=0.5, learning_rate=1.0)
      >>> params = jnp.array([1.0, -0.25, 3.0])
      >>> updates, state = tx.update(jnp.zeros(3), tx.init(params), params)
      >>> optax.apply_updates(params, updates)
      Array([0.5, 0. , 2.5], dtype=float32)

    References:
      Beck and Teboulle, `A Fast Iterative Shrinkage-Thresholding Algorithm for Linear Inverse
      Problems <https://doi.org/10.1137/080716542>`_, SIAM J. Imaging Sciences 2009; Parikh
      and Boyd, `Proximal Algorithms <https://web.stanford.edu/~boyd/papers/prox_algs.html>`_,
      2014; jaxopt's ``jaxopt.prox.prox_lasso``.
    """
    check_scalar("l1reg", l1reg)
    check_scalar("learning_rate", learning_rate)
    _check_mask(mask)

    def leaf_fn(u, w, x, hyper):
        eta, lam = hyper
        return _soft_threshold_update(u, w, x, eta * lam, None)

    tx = _proximal_step(ProxL1State, lambda eta, lam: eta * lam, leaf_fn, learning_rate, l1reg)
    return _with_mask(tx, mask)


def prox_elastic_net(
    l1reg: ScalarOrSchedule,
    l2reg: ScalarOrSchedule,
    learning_rate: ScalarOrSchedule,
    *,
    mask: Mask = None,
    l2_relative: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Proximal step of the elastic-net penalty, placed after the optimizer.

    With :math:`x = w + u`, :math:`\\eta` = ``learning_rate``, :math:`\\lambda` = ``l1reg``,
    :math:`\\gamma` = ``l2reg``, and by default (``l2_relative=True``, jaxopt's
    parametrization) the penalty :math:`\\lambda(\\|y\\|_1 + \\tfrac{\\gamma}{2}\\|y\\|_2^2)`:

    .. math:: \\operatorname{prox}(x) = \\frac{\\operatorname{sign}(x)\\max(|x| - \\eta\\lambda,
              0)}{1 + \\eta\\lambda\\gamma},\\qquad u' = \\operatorname{prox}(x) - w

    The same numbers as jaxopt's ``prox_elastic_net(w + u, (l1reg, l2reg),
    scaling=learning_rate)``. With ``l2_relative=False`` the L2 strength is absolute, as in
    :func:`add_elastic_net`: the penalty is :math:`\\lambda\\|y\\|_1 +
    \\tfrac{\\gamma}{2}\\|y\\|_2^2` and the denominator :math:`1 + \\eta\\gamma`. Entries with
    :math:`|x| \\le \\eta\\lambda` become exactly zero.

    Args:
      l1reg: :math:`\\lambda \\ge 0`; a number, an array or a schedule.
      l2reg: :math:`\\gamma \\ge 0`; a number, an array or a schedule.
      learning_rate: :math:`\\eta \\ge 0`, the optimizer's step size; a number or a schedule.
      mask: a tree of bools like the params, or a function ``params -> tree of bools``; False
        leaves pass through unchanged.
      l2_relative: True (default): the L2 strength is ``l1reg * l2reg`` (jaxopt); False: it is
        ``l2reg``.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`ProxElasticNetState`. Its
      ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, gradsafe as gs
      >>> tx = gs.prox_elastic_net(l1reg=0.5, l2reg=2.0, learning_rate=1.0)
      >>> params = jnp.array([1.0, -0.25, 3.5])
      >>> updates, state = tx.update(jnp.zeros(3), tx.init(params), params)
      >>> optax.apply_updates(params, updates)
      Array([0.25, 0.  , 1.5 ], dtype=float32)

    References:
      Zou and Hastie, `Regularization and Variable Selection via the Elastic Net
      <https://doi.org/10.1111/j.1467-9868.2005.00503.x>`_, JRSS B 2005; jaxopt's
      ``jaxopt.prox.prox_elastic_net``.
    """
    check_scalar("l1reg", l1reg)
    check_scalar("l2reg", l2reg)
    check_scalar("learning_rate", learning_rate)
    _check_mask(mask)
    _check_bool("l2_relative", l2_relative)

    def leaf_fn(u, w, x, hyper):
        eta, lam, gamma = hyper
        shrink = eta * lam * gamma if l2_relative else eta * gamma
        return _soft_threshold_update(u, w, x, eta * lam, shrink)

    tx = _proximal_step(
        ProxElasticNetState,
        lambda eta, lam, gamma: eta * lam,
        leaf_fn,
        learning_rate,
        l1reg,
        l2reg,
    )
    return _with_mask(tx, mask)


def prox_group_lasso(
    l2reg: ScalarOrSchedule, learning_rate: ScalarOrSchedule, *, mask: Mask = None
) -> optax.GradientTransformationExtraArgs:
    """Proximal step of the group-lasso penalty, one group per leaf (block soft-thresholding).

    For each leaf, with :math:`x = w + u` and :math:`t = \\eta\\lambda`
    (``learning_rate * l2reg``):

    .. math:: \\operatorname{prox}(x) = \\operatorname{argmin}_y \\tfrac12\\|y - x\\|_2^2
              + t\\|y\\|_2 = \\max\\Big(1 - \\frac{t}{\\|x\\|_2}, 0\\Big)\\,x,\\qquad
              u' = \\operatorname{prox}(x) - w

    A leaf with :math:`\\|x\\|_2 \\le t` becomes exactly zero as a whole (group sparsity: prune
    whole tensors; group rows or heads by giving them their own leaves). The same numbers as
    jaxopt's ``prox_group_lasso(leaf, l2reg, scaling=learning_rate)`` applied to each leaf.

    Differences from the reference: jaxopt thresholds the whole tree as one group (one leaf
    per call reproduces it), divides by zero at :math:`x = 0` (its output is 0 there, but
    ``jax.grad`` through it is NaN): here the factor uses a guarded division, so the step is
    safe at zero and ``jax.grad`` through it is finite. A leaf whose norm is not finite passes
    through unchanged (jaxopt makes it zero or NaN). The norm accumulates in float32. Under
    ``jax.jit`` with sharded arrays the norm covers the whole leaf; inside ``shard_map`` it
    would cover only the local shard (there is no ``axis_name`` here yet).

    Args:
      l2reg: :math:`\\lambda \\ge 0`; a number, an array or a schedule.
      learning_rate: :math:`\\eta \\ge 0`, the optimizer's step size; a number or a schedule.
      mask: a tree of bools like the params, or a function ``params -> tree of bools``; False
        leaves pass through unchanged.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with :class:`ProxGroupLassoState`. Its
      ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, gradsafe as gs
      >>> tx = gs.prox_group_lasso(l2reg=1.0, learning_rate=1.0)
      >>> params = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.6, 0.8])}
      >>> zeros = jax.tree.map(jnp.zeros_like, params)
      >>> updates, state = tx.update(zeros, tx.init(params), params)
      >>> optax.apply_updates(params, updates)
      {'a': Array([2.4, 3.2], dtype=float32), 'b': Array([0., 0.], dtype=float32)}

    References:
      Yuan and Lin, `Model Selection and Estimation in Regression with Grouped Variables
      <https://doi.org/10.1111/j.1467-9868.2005.00532.x>`_, JRSS B 2006; jaxopt's
      ``jaxopt.prox.prox_group_lasso``.
    """
    check_scalar("l2reg", l2reg)
    check_scalar("learning_rate", learning_rate)
    _check_mask(mask)

    def leaf_fn(u, w, x, hyper):
        eta, lam = hyper
        threshold = nonnegative(eta * lam)  # traced values out of range must not amplify
        norm = leaf_norm(x, 2).astype(threshold.dtype)
        shrinks = norm > threshold
        factor = jnp.where(shrinks, 1 - safe_ratio(threshold, norm, shrinks), 0)
        # A non-finite leaf passes through. Checked on the entries: the norm of a NaN leaf
        # need not be NaN (a safe square root may map it to 0).
        finite = jnp.isfinite(norm) & jnp.all(jnp.isfinite(x))
        factor = jnp.where(finite, factor, 1)
        factor = factor.astype(x.dtype)
        # factor * x - w = factor * u - (1 - factor) * w: exactly -w at 0, exactly u at 1
        new_update = factor * u - (1 - factor) * w
        zeros = jnp.where(factor == 0, x.size, jnp.sum(x == 0)).astype(jnp.float32)
        return new_update, zeros

    tx = _proximal_step(
        ProxGroupLassoState, lambda eta, lam: eta * lam, leaf_fn, learning_rate, l2reg
    )
    return _with_mask(tx, mask)


# --------------------------------------------------------------------------------------------
# clip_update_relative (Clippy)
# --------------------------------------------------------------------------------------------


@register_stats("clip_update_relative", "scale", "clipped", "count")
class ClipUpdateRelativeState(NamedTuple):
    """State of :func:`clip_update_relative`: steps seen, the smallest per-tensor factor
    applied this step, and whether any tensor was scaled down."""

    count: jax.Array
    scale: jax.Array
    clipped: jax.Array


def clip_update_relative(
    relative: ScalarOrSchedule = 0.1,
    absolute: ScalarOrSchedule = 1e-7,
    *,
    mask: Mask = None,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Clippy: bound every entry of the update relative to its parameter, one factor per tensor.

    For each leaf, with update :math:`u`, parameter :math:`w`, :math:`r` = ``relative`` and
    :math:`a` = ``absolute``, the update is scaled by the largest :math:`s \\le 1` such that

    .. math:: s\\,|u_j| \\le r\\,|w_j| + a \\quad \\text{for every entry } j,\\qquad
              s = \\min\\Big(1, \\min_{j:\\,u_j \\ne 0} \\frac{r|w_j| + a}{|u_j|}\\Big)

    One factor per tensor keeps the update's direction; the bound is per entry (an
    :math:`L_\\infty` test), so a large change in a few coordinates is caught where norm-based
    clipping would miss it. Place it after the optimizer: ``optax.chain(optax.adagrad(lr),
    gs.clip_update_relative())``. An entry that meets its bound exactly is not clipped; with
    ``absolute=0`` a zero parameter cannot move (keep ``absolute > 0``).

    Differences from the reference (TF Recommenders' ``shrink_by_references``, inside
    ``ClippyAdagrad``): here it is a transform for any optimizer, not an Adagrad variant (its
    ``accumulator_relative_threshold`` term is not provided); non-finite update entries, and
    entries whose bound is not finite, impose no bound, so a NaN or Inf update passes through
    unchanged for a guard to see (the reference scales the tensor by 0 or NaN).

    Args:
      relative: :math:`r \\ge 0`, the allowed change relative to :math:`|w_j|`; a number or a
        schedule.
      absolute: :math:`a \\ge 0`, the allowed change of a zero parameter; a number or a
        schedule.
      mask: a tree of bools like the params, or a function ``params -> tree of bools``; False
        leaves pass through unchanged.
      axis_name: mesh axis name(s) inside ``shard_map``/``pmap``: a tensor sharded along them
        gets one factor for all its shards (the smallest), as it would unsharded.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with
      :class:`ClipUpdateRelativeState`. Its ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, gradsafe as gs
      >>> tx = gs.clip_update_relative(relative=0.1, absolute=0.0)
      >>> params = jnp.array([1.0, 10.0])
      >>> updates, state = tx.update(jnp.array([0.5, 0.5]), tx.init(params), params)
      >>> updates, float(state.scale)
      (Array([0.1, 0.1], dtype=float32), 0.2)

    References:
      Tang, Yang, Xu et al., `Improving Training Stability for Multitask Ranking Models in
      Recommender Systems <https://arxiv.org/abs/2302.09178>`_, KDD 2023.
    """
    check_scalar("relative", relative)
    check_scalar("absolute", absolute)
    _check_mask(mask)
    check_axis_name(axis_name)

    def init_fn(params: Any) -> ClipUpdateRelativeState:
        del params
        return ClipUpdateRelativeState(zero_count(), jnp.ones([], jnp.float32), jnp.array(False))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        require_params(params)
        # traced values out of range must not amplify: clamped once per dtype, not per leaf
        values_in = _resolver((relative, absolute), state.count, post=nonnegative)
        scales: list[jax.Array] = []

        def clip_leaf(u: jax.Array, w: jax.Array) -> jax.Array:
            real = accumulation_dtype(compute_dtype(u.dtype, w.dtype))
            r_now, a_now = values_in(real)
            size = jnp.abs(u).astype(real)
            bound = r_now * jnp.abs(w).astype(real) + a_now
            # An entry whose bound is not finite (a NaN or Inf parameter) imposes none.
            limit = jnp.where(jnp.isfinite(bound), bound, jnp.inf)
            ratio = clip_factor(size, limit, exact_zero=True)
            # min over the entries of all shards: -max(-x), as the device reduction has max
            scale = -reduce_leaf_across_devices(-jnp.min(ratio, initial=1.0), u, axis_name, "max")
            scales.append(scale.astype(jnp.float32))
            return scale_leaf(u, scale)

        updates = _map_with_params(clip_leaf, updates, params)
        smallest = jnp.min(jnp.stack(scales)) if scales else jnp.ones([], jnp.float32)
        new_state = ClipUpdateRelativeState(
            count=safe_increment(state.count), scale=smallest, clipped=smallest < 1
        )
        return updates, new_state

    return _with_mask(optax.GradientTransformationExtraArgs(init_fn, update_fn), mask)


__all__ = [
    "AddElasticNetState",
    "AddL1State",
    "AddL2State",
    "ClipUpdateRelativeState",
    "ProxElasticNetState",
    "ProxGroupLassoState",
    "ProxL1State",
    "add_elastic_net",
    "add_l1",
    "add_l2",
    "clip_update_relative",
    "prox_elastic_net",
    "prox_group_lasso",
    "prox_l1",
]
