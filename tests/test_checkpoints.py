"""Every public gradsafe transform's state survives a checkpoint and resumes bit-for-bit.

For each transform (built from ``gradsafe.__all__``; a public factory without a case here fails
the coverage test) a short training run is interrupted after ``RESUME_AT`` steps, its params and
optimizer state go through orbax (``StandardCheckpointer``, restored onto a
``jax.eval_shape(tx.init, params)`` target), ``flax.serialization.to_bytes``/``from_bytes`` and
``to_state_dict``/``from_state_dict``, and the restored run must match the uninterrupted one
bit for bit at every later step: updates, params and every state leaf.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx, serialization
from public_api import NOT_TRANSFORMS, public_factories

import gradsafe as gs

STEPS = 7
RESUME_AT = 3  # odd, so accumulate(every_k=2) is interrupted in the middle of a cycle
SPIKE_STEPS = (2, 5)  # gradient and loss spikes, before and after the interruption
NONFINITE_STEP = 4  # a NaN gradient, only for the cases that refuse such steps


class Case(NamedTuple):
    make: Callable[[], optax.GradientTransformation]
    nonfinite: bool = False  # feed a NaN gradient at NONFINITE_STEP
    # Called with the states of the uninterrupted run (one per step): asserts that the
    # fixture really exercises the transform (clips, refusals) on both sides of RESUME_AT.
    check: Callable[[list[Any]], None] | None = None


def _check_guards(states: list[Any]) -> None:
    stats = [gs.metrics(state) for state in states]
    overflows = [int(s["dynamic_loss_scale/total_skips"]) for s in stats]
    assert overflows == [int(i >= NONFINITE_STEP) for i in range(STEPS)], overflows
    spikes = [int(s["skip_on_spike/total_skips"]) for s in stats]
    assert spikes == [sum(i >= spike for spike in SPIKE_STEPS) for i in range(STEPS)], spikes


def _check_zclip(states: list[Any]) -> None:
    clipped = [bool(state.clipped) for state in states]
    assert all(clipped[i] for i in SPIKE_STEPS), clipped


def _standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` traced with standard dtype promotion: Adam's bias correction mixes a Python float
    with the int32 count, which the suite's strict promotion refuses."""

    def update_fn(updates, state, params=None, **extra_args):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _adam() -> optax.GradientTransformation:
    return _standard_promotion(optax.adam(1e-2))


# Keyed by "<public factory>" or "<public factory>[variant]". Warm-ups, windows and intervals
# are short so that each transform's adaptive machinery is running on both sides of RESUME_AT.
CASES: dict[str, Case] = {
    "accumulate": Case(lambda: gs.accumulate(_adam(), every_k=2)),
    "accumulate[clip_each]": Case(
        lambda: gs.accumulate(optax.sgd(0.1), every_k=2, clip_each=gs.clip_by_global_norm(1.0))
    ),
    "adagc": Case(lambda: gs.adagc(warmup_steps=2)),
    "adagc[global]": Case(lambda: gs.adagc(warmup_steps=2, scope="global")),
    "adaptive_grad_clip": Case(lambda: gs.adaptive_grad_clip(0.05)),
    "add_elastic_net": Case(lambda: gs.add_elastic_net(1e-2, 1e-2)),
    "add_l1": Case(lambda: gs.add_l1(1e-2)),
    "add_l2": Case(lambda: gs.add_l2(1e-2)),
    "autoclip": Case(lambda: gs.autoclip(25.0)),
    "autoclip[window]": Case(lambda: gs.autoclip(25.0, window=4)),
    "clip_by_block_rms": Case(lambda: gs.clip_by_block_rms(0.5)),
    "clip_by_global_norm": Case(lambda: gs.clip_by_global_norm(1.0)),
    "clip_by_leaf_norm": Case(lambda: gs.clip_by_leaf_norm(1.0)),
    "clip_by_value": Case(lambda: gs.clip_by_value(0.5)),
    "clip_update_relative": Case(lambda: gs.clip_update_relative(0.1)),
    "cooldown_on_spike": Case(lambda: gs.cooldown_on_spike(warmup_steps=2, recovery_steps=3)),
    "decay": Case(lambda: gs.decay(optax.exponential_decay(1.0, 1, 0.8))),
    "dynamic_loss_scale": Case(
        lambda: gs.dynamic_loss_scale(_adam(), init_scale=1024.0, growth_interval=2),
        nonfinite=True,
    ),
    "prox_elastic_net": Case(lambda: gs.prox_elastic_net(0.05, 0.05, 0.1)),
    "prox_group_lasso": Case(lambda: gs.prox_group_lasso(0.05, 0.1)),
    "prox_l1": Case(lambda: gs.prox_l1(0.05, 0.1)),
    "skip_nonfinite": Case(lambda: gs.skip_nonfinite(_adam()), nonfinite=True),
    "skip_on_spike": Case(lambda: gs.skip_on_spike(optax.sgd(0.1), window=4, min_history=2)),
    "spike_clip": Case(lambda: gs.spike_clip(2.0, warmup_steps=2, reset_interval=3)),
    "split_by_path": Case(
        lambda: gs.split_by_path(
            {"bias$": gs.zclip(warmup_steps=2), "kernel$": _adam()},
            default=gs.clip_by_global_norm(1.0),
        )
    ),
    "split_clip": Case(lambda: gs.split_clip(gs.clip_by_global_norm(1.0), max_residual_norm=5.0)),
    "split_magnitude": Case(lambda: gs.split_magnitude()),
    "stabilize": Case(lambda: gs.stabilize(_adam()), nonfinite=True),
    "stabilize[all_guards]": Case(
        lambda: gs.stabilize(
            _standard_promotion(optax.adamw(1e-2)),
            clip=gs.zclip(warmup_steps=2),
            skip_spikes={"window": 4, "min_history": 2},
            loss_scale={"init_scale": 1024.0, "growth_interval": 2},
        ),
        nonfinite=True,
        check=_check_guards,
    ),
    "zclip": Case(lambda: gs.zclip(warmup_steps=2), check=_check_zclip),
}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _params() -> dict[str, Any]:
    key_kernel, key_bias = jax.random.split(jax.random.key(0))
    return {
        "dense": {
            "kernel": jax.random.normal(key_kernel, (3, 4), jnp.float32),
            "bias": jax.random.normal(key_bias, (4,), jnp.float32) * 0.1,
        },
        "scale": jnp.ones([], jnp.float32),
    }


def _batch(step: int, nonfinite: bool) -> tuple[Any, jax.Array]:
    """The gradient and loss fed at ``step``: noisy, growing, with spikes (and maybe a NaN)."""
    params = _params()
    keys = iter(jax.random.split(jax.random.key(1000 + step), 3))
    factor = 50.0 if step in SPIKE_STEPS else 1.0 + 0.2 * step
    grads = jax.tree.map(
        lambda p: (jax.random.normal(next(keys), p.shape, p.dtype) * factor).astype(p.dtype),
        params,
    )
    if nonfinite and step == NONFINITE_STEP:
        grads["dense"]["bias"] = grads["dense"]["bias"].at[0].set(jnp.nan)
    loss = 20.0 if step in SPIKE_STEPS else 1.0 + 0.1 * np.sin(step)
    return grads, jnp.asarray(loss, jnp.float32)


def _make_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
    def step(params: Any, opt_state: Any, grads: Any, loss: jax.Array) -> Any:
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        return updates, optax.apply_updates(params, updates), opt_state

    # Compiling dominates this file's time; XLA's cheapest backend optimisation level halves it.
    # Both runs use the same executable, so the bit-for-bit comparison is unaffected.
    return jax.jit(step, compiler_options={"xla_backend_optimization_level": 0})


def _run(step: Callable[..., Any], params: Any, opt_state: Any, steps: range, nonfinite: bool):
    """Run ``steps``; return the final (params, state) and every step's (updates, params, state)."""
    # Commit everything to one device, as orbax's restored arrays are, so that the reference and
    # the resumed runs share one compiled step.
    params, opt_state = jax.device_put((params, opt_state), jax.devices()[0])
    history = []
    for index in steps:
        grads, loss = _batch(index, nonfinite)
        updates, params, opt_state = step(params, opt_state, grads, loss)
        history.append((updates, params, opt_state))
    return params, opt_state, history


def _assert_bitwise_equal(actual: Any, expected: Any, what: str) -> None:
    """Same tree structure (NamedTuple types included), and every leaf equal bit for bit."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(expected)]
    for path, a, e in zip(paths, jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        where = f"{what} at {jax.tree_util.keystr(path)}"
        assert a.dtype == e.dtype, f"{where}: dtype {a.dtype} != {e.dtype}"
        assert a.shape == e.shape, f"{where}: shape {a.shape} != {e.shape}"
        assert a.tobytes() == e.tobytes(), f"{where}: {a} != {e}"


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _orbax_round_trip(tx: optax.GradientTransformation, params: Any, opt_state: Any, tmp_path):
    path = tmp_path / "orbax"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, {"params": params, "opt_state": opt_state})
        checkpointer.wait_until_finished()
        target = {"params": _abstract(_params()), "opt_state": jax.eval_shape(tx.init, _params())}
        restored = checkpointer.restore(path, target)
    return restored["params"], restored["opt_state"]


def _flax_bytes_round_trip(tx: optax.GradientTransformation, params: Any, opt_state: Any, _):
    data = serialization.to_bytes({"params": params, "opt_state": opt_state})
    target = {"params": _params(), "opt_state": tx.init(_params())}
    restored = serialization.from_bytes(target, data)
    return restored["params"], restored["opt_state"]


def _flax_state_dict_round_trip(tx: optax.GradientTransformation, params: Any, opt_state: Any, _):
    state_dict = serialization.to_state_dict({"params": params, "opt_state": opt_state})
    # What a user stores: plain nested dicts of numpy arrays.
    state_dict = jax.tree.map(np.asarray, state_dict)
    target = {"params": _params(), "opt_state": tx.init(_params())}
    restored = serialization.from_state_dict(target, state_dict)
    return restored["params"], restored["opt_state"]


ROUND_TRIPS = {
    "orbax": _orbax_round_trip,
    "flax_bytes": _flax_bytes_round_trip,
    "flax_state_dict": _flax_state_dict_round_trip,
}


def _node_types(tree: Any) -> set[type]:
    """Types of every tuple (NamedTuple states) inside ``tree``."""
    found: set[type] = set()
    if isinstance(tree, tuple):
        found.add(type(tree))
    if isinstance(tree, (tuple, list)):
        for child in tree:
            found |= _node_types(child)
    elif isinstance(tree, dict):
        for child in tree.values():
            found |= _node_types(child)
    return found


# --------------------------------------------------------------------------------------------
# Coverage: the case list cannot silently go stale
# --------------------------------------------------------------------------------------------


def test_every_public_factory_has_a_checkpoint_case():
    covered = {name.split("[")[0] for name in CASES}
    factories = public_factories()
    assert factories, "no factory found in gradsafe.__all__"
    missing = sorted(factories - covered)
    assert not missing, f"add a case to tests/test_checkpoints.py CASES for: {missing}"
    stale = sorted(covered - factories)
    assert not stale, f"CASES names that are not public factories: {stale}"


def test_every_public_callable_is_classified():
    callables = {
        name
        for name in gs.__all__
        if callable(getattr(gs, name)) and not inspect.isclass(getattr(gs, name))
    }
    unclassified = sorted(callables - public_factories() - NOT_TRANSFORMS)
    assert not unclassified, (
        f"public callables neither in CASES nor in NOT_TRANSFORMS: {unclassified}; a transform "
        "factory must be annotated '-> optax.GradientTransformationExtraArgs'"
    )
    assert not NOT_TRANSFORMS & public_factories()
    assert set(gs.__all__) >= NOT_TRANSFORMS, sorted(NOT_TRANSFORMS - set(gs.__all__))


def test_every_public_state_class_is_checkpointed():
    seen: set[type] = set()
    for case in CASES.values():
        seen |= _node_types(jax.eval_shape(case.make().init, _params()))
    public_states = {
        getattr(gs, name)
        for name in gs.__all__
        if inspect.isclass(getattr(gs, name)) and name.endswith("State")
    }
    unseen = sorted(cls.__name__ for cls in public_states - seen)
    assert not unseen, f"no case in CASES builds these states: {unseen}"


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_resumed_run_matches_uninterrupted_run(name, tmp_path):
    case = CASES[name]
    tx = case.make()
    step = _make_step(tx)
    params = _params()
    initial_state = tx.init(params)

    # The state tree is fixed from init on, and eval_shape(init) describes it exactly.
    assert jax.tree.structure(jax.eval_shape(tx.init, params)) == jax.tree.structure(initial_state)

    _, _, reference = _run(step, params, initial_state, range(STEPS), case.nonfinite)
    _, interrupted_params, interrupted_state = reference[RESUME_AT - 1]
    assert jax.tree.structure(interrupted_state) == jax.tree.structure(initial_state)

    for method, round_trip in ROUND_TRIPS.items():
        restored_params, restored_state = round_trip(
            tx, interrupted_params, interrupted_state, tmp_path / method
        )
        _assert_bitwise_equal(restored_params, interrupted_params, f"{name}/{method}: params")
        _assert_bitwise_equal(restored_state, interrupted_state, f"{name}/{method}: state")
        _, _, resumed = _run(
            step, restored_params, restored_state, range(RESUME_AT, STEPS), case.nonfinite
        )
        for offset, (got, want) in enumerate(zip(resumed, reference[RESUME_AT:], strict=True)):
            _assert_bitwise_equal(got, want, f"{name}/{method}: step {RESUME_AT + offset}")

    if case.check is not None:
        case.check([state for _, _, state in reference])
    # The state moves after the interruption, so the comparison above is not vacuous.
    final_leaves = jax.tree.leaves(reference[-1][2])
    interrupted_leaves = jax.tree.leaves(interrupted_state)
    assert any(
        np.asarray(a).tobytes() != np.asarray(b).tobytes()
        for a, b in zip(final_leaves, interrupted_leaves, strict=True)
    ), f"{name}: the state did not change after step {RESUME_AT}"


# --------------------------------------------------------------------------------------------
# flax.nnx: the Optimizer's state through orbax, as the NNX docs do it
# --------------------------------------------------------------------------------------------


class _Regressor(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(3, 4, rngs=rngs)
        self.out = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(x)))


@nnx.jit
def _nnx_train_step(model: _Regressor, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
    def loss_fn(m: _Regressor) -> jax.Array:
        return jnp.mean(jnp.square(m(x) - y))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, value=loss)
    return loss


def _nnx_batch(step: int) -> tuple[jax.Array, jax.Array]:
    x = jax.random.normal(jax.random.key(2000 + step), (8, 3), jnp.float32)
    y = jnp.sum(x, axis=1, keepdims=True) * (50.0 if step in SPIKE_STEPS else 1.0)
    return x, y


def test_nnx_optimizer_resumes_bit_for_bit_from_orbax(tmp_path):
    tx = gs.stabilize(
        _adam(), clip=gs.zclip(warmup_steps=2), skip_spikes={"window": 4, "min_history": 2}
    )

    def build() -> tuple[_Regressor, nnx.Optimizer]:
        model = _Regressor(nnx.Rngs(0))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    def train(model: _Regressor, optimizer: nnx.Optimizer, steps: range) -> list[jax.Array]:
        return [_nnx_train_step(model, optimizer, *_nnx_batch(step)) for step in steps]

    model, optimizer = build()
    reference_losses = train(model, optimizer, range(STEPS))
    reference = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    refusals = int(gs.metrics(optimizer.opt_state)["skip_on_spike/total_skips"])

    model, optimizer = build()
    train(model, optimizer, range(RESUME_AT))
    # A spike is refused on each side of the interruption.
    assert 0 < int(gs.metrics(optimizer.opt_state)["skip_on_spike/total_skips"]) < refusals
    path = tmp_path / "nnx"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, {"model": nnx.state(model), "optimizer": nnx.state(optimizer)})
        checkpointer.wait_until_finished()
        abstract_model, abstract_optimizer = nnx.eval_shape(build)
        target = {"model": nnx.state(abstract_model), "optimizer": nnx.state(abstract_optimizer)}
        restored = checkpointer.restore(path, target)

    model, optimizer = build()  # a fresh process: new objects, then the checkpoint on top
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    assert int(optimizer.step[...]) == RESUME_AT
    resumed_losses = train(model, optimizer, range(RESUME_AT, STEPS))

    _assert_bitwise_equal(resumed_losses, reference_losses[RESUME_AT:], "nnx: losses")
    resumed = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    _assert_bitwise_equal(resumed, reference, "nnx: model and optimizer state")
