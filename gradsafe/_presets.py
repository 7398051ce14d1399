"""Presets: the recommended stack of guards and clipping around any Optax optimizer."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

import jax.numpy as jnp
import numpy as np
import optax

from gradsafe import _adaptive, _clipping, _guards, _regularization
from gradsafe._numerics import AxisName, check_axis_name, check_scalar, is_traced

# The clippers ``stabilize(clip="name")`` accepts, built with these defaults. An explicit table:
# a name that is not a gradient clipper (a splitting or regularization transform, a helper)
# is rejected instead of being looked up on the package.
_CLIPPERS: dict[str, tuple[Callable[..., optax.GradientTransformation], tuple[Any, ...]]] = {
    "zclip": (_adaptive.zclip, ()),
    "autoclip": (_adaptive.autoclip, ()),
    "adagc": (_adaptive.adagc, ()),
    "spike_clip": (_adaptive.spike_clip, ()),
    "clip_by_global_norm": (_clipping.clip_by_global_norm, (1.0,)),
    "clip_by_leaf_norm": (_clipping.clip_by_leaf_norm, (1.0,)),
    "clip_by_value": (_clipping.clip_by_value, (1.0,)),
    "clip_by_block_rms": (_clipping.clip_by_block_rms, (1.0,)),
    "adaptive_grad_clip": (_clipping.adaptive_grad_clip, (0.01,)),
}
CLIPPER_NAMES = tuple(_CLIPPERS)
# limit_updates=True: an entry may change by 10% of its magnitude plus 0.01 per step. The
# absolute part keeps the limit out of the way of Adam-like updates (about the learning rate
# per entry) at ordinary learning rates; benchmarks/stability.py measured the choice.
UPDATE_LIMIT = {"relative": 0.1, "absolute": 1e-2}
_MISSING_PARAMS = (
    "stabilize(...) limits each update relative to the parameters (limit_updates={!r}, "
    "gradsafe.clip_update_relative), so update() needs them: call "
    "tx.update(grads, opt_state, params), or build it with stabilize(..., limit_updates=False)"
)


def _is_transform(x: Any) -> TypeGuard[optax.GradientTransformation]:
    return callable(getattr(x, "init", None)) and callable(getattr(x, "update", None))


def _named_clip(name: str, axis_name: AxisName) -> optax.GradientTransformation:
    """The gradsafe clipper called ``name`` in ``_CLIPPERS``, built with its defaults."""
    if name not in _CLIPPERS:
        raise ValueError(
            f"clip must be None, a transform or the name of a gradsafe clipper, one of "
            f"{CLIPPER_NAMES}; got {name!r}"
        )
    factory, args = _CLIPPERS[name]
    kwargs = {}
    if axis_name is not None and "axis_name" in inspect.signature(factory).parameters:
        kwargs["axis_name"] = axis_name
    return factory(*args, **kwargs)


def _is_number(value: Any) -> bool:
    """A real number: a Python int/float, a NumPy/JAX scalar or 0-d array (also a tracer, as
    ``inject_hyperparams`` passes them), but not a bool."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, float)):
        return True
    dtype = getattr(value, "dtype", None)
    # (1,) too: the other hyperparameters take it as a scalar (see _numerics.resolve)
    return (
        dtype is not None
        and np.shape(value) in ((), (1,))
        and (np.issubdtype(dtype, np.integer) or jnp.issubdtype(dtype, jnp.floating))
    )


def _options(name: str, value: Any, first_arg: str | None = None) -> dict[str, Any] | None:
    """None (off) or the keyword arguments for a guard given as bool, number or mapping."""
    if value is None or value is False:
        return None
    dynamic = name == "loss_scale"
    if value is True or (dynamic and isinstance(value, str) and value == "dynamic"):
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if first_arg is not None and _is_number(value):
        # checked here so that an error names the argument the caller wrote (and the guard's
        # argument it sets); a tracer (under inject_hyperparams + jit) is kept as given and
        # taken as a scalar downstream
        check_scalar(f"{name} (its {first_arg})", value)
        return {first_arg: value if is_traced(value) else float(np.asarray(value).reshape(()))}
    allowed = ["None", "False", "True"]
    allowed += ["'dynamic'"] if dynamic else []
    allowed += [f"a number (its {first_arg})"] if first_arg else []
    raise ValueError(
        f"{name} must be {', '.join(allowed)} or a mapping of keyword arguments; got {value!r}"
    )


def stabilize(
    optimizer: optax.GradientTransformation,
    *,
    clip: str | optax.GradientTransformation | None = "zclip",
    limit_updates: bool | float | Mapping[str, Any] = True,
    skip_nonfinite: bool | str = True,
    skip_spikes: bool | Mapping[str, Any] = False,
    loss_scale: bool | float | str | Mapping[str, Any] | None = None,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """The recommended stack around any Optax optimizer, in one line.

    From the outside in::

        dynamic_loss_scale(            # if loss_scale
          skip_on_spike(               # if skip_spikes
            skip_nonfinite(            # if skip_nonfinite (and no guard above)
              chain(clip, optimizer,
                    clip_update_relative)))) # if limit_updates

    Why this order:

    * **Loss scaling outermost**: every other piece must see the true, unscaled gradient
      (norms, spike statistics and clip thresholds are meaningless on a scaled one), and an
      overflow must be refused before anything records it.
    * **Guards outside the clip and the optimizer**: a refused step must leave *all* state
      alone, including the clipper's history (ZClip's running mean, AutoClip's percentiles),
      which a NaN or a spike would otherwise poison. Every guard refuses non-finite steps, so
      only the outermost one is kept: with ``loss_scale`` or ``skip_spikes`` the separate
      :func:`skip_nonfinite` layer is left out (its checks happen anyway).
    * **Spike detection on the raw gradient norm**: it sits outside the clip, so it sees the
      norm before clipping (a clipped norm never spikes).
    * **Clip before the optimizer**: the optimizer's moments see bounded gradients, as
      ``optax.chain(clip_by_global_norm(...), adamw(...))`` does.
    * **Limit the update after the optimizer**: clipping the gradient bounds nothing once an
      optimizer normalises it (Adam's step is about the learning rate per entry whatever the
      gradient's size) or accumulates it (momentum). :func:`gradsafe.clip_update_relative`
      scales each tensor's update so that no entry changes by more than
      :math:`0.1\\,|w_j| + 0.01` in one step: a learning rate that is too large then slows
      training down instead of blowing the weights up. At ordinary learning rates the limit
      is rarely reached. In ``benchmarks/stability.py`` it took ``stabilize`` from diverging
      in some runs on three of the five tasks to none, with the widest stable LR range on
      every task.

    On a refused step the guard's fields in :func:`gradsafe.metrics` describe that step
    (``skipped``, ``reason``), while the clipper's and the limit's fields still show the last
    *accepted* step: their state is kept bit-for-bit. Read the reason as a name with
    :func:`gradsafe.skip_reason`.

    Each guard counts only its own refusals in :func:`gradsafe.metrics` (a spike refused by
    ``skip_on_spike`` shows as ``skip_on_spike/skipped``, not under ``dynamic_loss_scale``,
    whose growth tracker counts it as a clean step).

    Args:
      optimizer: any Optax optimizer (or transform).
      clip: the name of a gradsafe clipper, one of :data:`CLIPPER_NAMES` (``"zclip"``,
        ``"autoclip"``, ``"adagc"``, ``"spike_clip"``, ``"clip_by_global_norm"`` (max_norm
        1.0), ``"clip_by_leaf_norm"`` (1.0), ``"clip_by_value"`` (1.0),
        ``"clip_by_block_rms"`` (1.0), ``"adaptive_grad_clip"`` (0.01); built with these
        defaults), any transform, or None for no clipping.
      limit_updates: True (:func:`gradsafe.clip_update_relative` with ``relative=0.1,
        absolute=0.01``), False, a number (its ``relative``, with ``absolute=0.01``; a 0-d
        array too, as ``optax.inject_hyperparams`` passes it) or a mapping of keyword
        arguments for it. Needs ``params`` in ``update``: without them ``update`` raises a
        ``ValueError`` that says so (``limit_updates=False`` turns the limit off).
      skip_nonfinite: True (the guard's ``check="gradient"``), ``"full"`` (also check the
        update and the new optimizer state; see :func:`gradsafe.skip_nonfinite` for which
        optimizers need it) or False.
      skip_spikes: False, True (:func:`gradsafe.skip_on_spike` with its defaults) or a mapping
        of keyword arguments for it. Pass the loss as ``update(..., value=loss)``.
      loss_scale: None (off), True or ``"dynamic"`` (:func:`gradsafe.dynamic_loss_scale` with
        its defaults), a number (its ``init_scale``) or a mapping of keyword arguments for it.
        Multiply the loss by :func:`gradsafe.loss_scale` ``(opt_state)`` in the training step.
      axis_name: mesh axis name(s) inside ``shard_map``/``pmap``, passed to the guards and to a
        clipper named by string that accepts it.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, optax, gradsafe as gs
      >>> tx = gs.stabilize(optax.sgd(1.0), clip="clip_by_global_norm")
      >>> params = jnp.array([10.0, 1.0])
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([3.0, 4.0]), state, params)
      >>> [round(float(u), 4) for u in updates]  # norm clipped to 1, then |u_2| <= 0.1 * 1 + 0.01
      [-0.0825, -0.11]
      >>> updates, state = tx.update(jnp.array([jnp.nan, 4.0]), state, params)
      >>> updates, int(gs.metrics(state)["skip_nonfinite/total_skips"])
      (Array([0., 0.], dtype=float32), 1)

    References:
      Micikevicius et al., `Mixed Precision Training <https://arxiv.org/abs/1710.03740>`_,
      ICLR 2018; Team OLMo, `2 OLMo 2 Furious <https://arxiv.org/abs/2501.00656>`_, 2025;
      Kumar et al., `ZClip <https://arxiv.org/abs/2504.02507>`_, 2025; Tang et al.,
      `Improving Training Stability for Multitask Ranking Models in Recommender Systems
      <https://arxiv.org/abs/2302.09178>`_, KDD 2023 (the relative update limit).
    """
    if not _is_transform(optimizer):
        raise ValueError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}")
    check_axis_name(axis_name)
    if not isinstance(skip_nonfinite, bool) and skip_nonfinite not in _guards.CHECKS:
        raise ValueError(
            f"skip_nonfinite must be True, False or one of {_guards.CHECKS}, got {skip_nonfinite!r}"
        )
    check = skip_nonfinite if isinstance(skip_nonfinite, str) else "gradient"
    limit_options = _options("limit_updates", limit_updates, first_arg="relative")
    spike_options = _options("skip_spikes", skip_spikes)
    scale_options = _options("loss_scale", loss_scale, first_arg="init_scale")
    if isinstance(clip, str):
        clip_transform = _named_clip(clip, axis_name)
    elif clip is None or _is_transform(clip):
        clip_transform = clip
    else:
        raise ValueError(f"clip must be None, a transform or a clipper's name, got {clip!r}")

    parts = [optimizer] if clip_transform is None else [clip_transform, optimizer]
    if limit_options is not None:
        limit_options = {**UPDATE_LIMIT, "axis_name": axis_name, **limit_options}
        parts.append(_regularization.clip_update_relative(**limit_options))
    tx = parts[0] if len(parts) == 1 else optax.chain(*parts)
    if skip_nonfinite and spike_options is None and scale_options is None:
        tx = _guards.skip_nonfinite(tx, check=check, axis_name=axis_name)
    if spike_options is not None:
        tx = _guards.skip_on_spike(tx, **{"axis_name": axis_name, **spike_options})
    if scale_options is not None:
        options = {"axis_name": axis_name, "check": check, **scale_options}
        tx = _guards.dynamic_loss_scale(tx, **options)
    tx = optax.with_extra_args_support(tx)
    if limit_options is None:
        return tx

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(_MISSING_PARAMS.format(limit_updates))
        return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)
