"""Presets: the recommended stack of guards and clipping around any Optax optimizer."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, TypeGuard

import optax

from gradsafe import _guards, _regularization
from gradsafe._numerics import AxisName, check_axis_name

# Positional arguments for clippers named by string that have no default threshold.
_NAMED_CLIP_ARGS: dict[str, tuple[Any, ...]] = {
    "clip_by_global_norm": (1.0,),
    "clip_by_leaf_norm": (1.0,),
    "clip_by_value": (1.0,),
    "clip_by_block_rms": (1.0,),
    "adaptive_grad_clip": (0.01,),
}
_SUGGESTED = "'zclip', 'autoclip', 'adagc', 'clip_by_global_norm'"
# limit_updates=True: an entry may change by 10% of its magnitude plus 0.01 per step. The
# absolute part keeps the limit out of the way of Adam-like updates (about the learning rate
# per entry) at ordinary learning rates; benchmarks/stability.py measured the choice.
UPDATE_LIMIT = {"relative": 0.1, "absolute": 1e-2}


def _is_transform(x: Any) -> TypeGuard[optax.GradientTransformation]:
    return callable(getattr(x, "init", None)) and callable(getattr(x, "update", None))


def _named_clip(name: str, axis_name: AxisName) -> optax.GradientTransformation:
    """The gradsafe clipper called ``name``, built with its defaults (looked up at call time)."""
    import gradsafe  # resolved lazily: clippers may be added after this module

    factory = getattr(gradsafe, name, None) if not name.startswith("_") else None
    if factory is None or not callable(factory):
        raise ValueError(
            f"clip must be None, a transform or the name of a gradsafe clipper ({_SUGGESTED}, "
            f"...); gradsafe has no {name!r}"
        )
    kwargs = {}
    try:
        accepts_axis = "axis_name" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        accepts_axis = False
    if axis_name is not None and accepts_axis:
        kwargs["axis_name"] = axis_name
    try:
        transform = factory(*_NAMED_CLIP_ARGS.get(name, ()), **kwargs)
    except TypeError as error:
        raise ValueError(
            f"clip={name!r} cannot be built without arguments; pass gs.{name}(...) instead"
        ) from error
    if not _is_transform(transform):
        raise ValueError(f"clip={name!r} is not a gradient transformation factory")
    return transform


def _options(name: str, value: Any, first_arg: str | None = None) -> dict[str, Any] | None:
    """None (off) or the keyword arguments for a guard given as bool, number or mapping."""
    if value is None or value is False:
        return None
    dynamic = name == "loss_scale"
    if value is True or (dynamic and value == "dynamic"):
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if first_arg is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        return {first_arg: float(value)}
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
    skip_nonfinite: bool = True,
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

    Each guard counts only its own refusals in :func:`gradsafe.metrics` (a spike refused by
    ``skip_on_spike`` shows as ``skip_on_spike/skipped``, not under ``dynamic_loss_scale``,
    whose growth tracker counts it as a clean step).

    Args:
      optimizer: any Optax optimizer (or transform).
      clip: the name of a gradsafe clipper (``"zclip"``, ``"autoclip"``, ``"adagc"``,
        ``"clip_by_global_norm"`` (max_norm 1.0), ...; built with its defaults, looked up when
        ``stabilize`` is called), any transform, or None for no clipping.
      limit_updates: True (:func:`gradsafe.clip_update_relative` with ``relative=0.1,
        absolute=0.01``), False, a number (its ``relative``, with ``absolute=0.01``) or a
        mapping of keyword arguments for it. Needs ``params`` in ``update``.
      skip_nonfinite: refuse steps with a NaN/Inf gradient, loss, update or optimizer state.
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
    if not isinstance(skip_nonfinite, bool):
        raise ValueError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}")
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
        tx = _guards.skip_nonfinite(tx, axis_name=axis_name)
    if spike_options is not None:
        tx = _guards.skip_on_spike(tx, **{"axis_name": axis_name, **spike_options})
    if scale_options is not None:
        tx = _guards.dynamic_loss_scale(tx, **{"axis_name": axis_name, **scale_options})
    return optax.with_extra_args_support(tx)
