"""Behaviour of the adaptive clippers: jit, checkpoints, hyperparameter injection, schedules,
stats and bad arguments. Parity: test_adaptive_parity.py; sharding and numerical edge cases:
test_adaptive_sharding.py, test_adaptive_edges.py."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from adaptive_cases import FACTORIES, assert_trees_close, run_jitted, sequence

import gradsafe as gs

# --------------------------------------------------------------------------------------------
# jit, checkpoints, lax control flow
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FACTORIES)
def test_checkpoint_round_trip_mid_sequence(name):
    tx = FACTORIES[name]()
    grads = sequence(30)
    outs, states = run_jitted(tx, grads)
    saved = flax.serialization.to_bytes(states[14])
    restored = flax.serialization.from_bytes(tx.init(grads[0]), saved)
    assert jax.tree.structure(restored) == jax.tree.structure(states[14])
    resumed_outs, resumed_states = run_jitted(tx, grads[15:], restored)
    assert_trees_close(resumed_outs, outs[15:], rtol=0, atol=0)
    assert_trees_close(resumed_states[-1], states[-1], rtol=0, atol=0)


@pytest.mark.parametrize("name", FACTORIES)
def test_state_survives_lax_cond_and_keeps_its_shapes(name):
    tx = FACTORIES[name]()
    grads = sequence(8)
    state = tx.init(grads[0])
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)

    @jax.jit
    def step(g, state, apply):
        return jax.lax.cond(apply, lambda: tx.update(g, state), lambda: (g, state))

    for g in grads:
        _, state = step(g, state, True)
        _, state = step(g, state, False)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
    assert int(state.count) == len(grads)


# --------------------------------------------------------------------------------------------
# inject_hyperparams and schedules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, kwargs, static",
    [
        (gs.zclip, {"alpha": 0.9, "z_thresh": 2.0, "max_norm": None, "warmup_steps": 5}, ()),
        (gs.zclip, {"warmup_steps": 5, "mode": "percentile", "max_norm": 2.0}, ()),
        (gs.autoclip, {"percentile": 25.0}, ()),
        (gs.autoclip, {"percentile": 25.0, "window": 8}, ("window",)),
        (gs.adagc, {"relative": 1.1, "beta": 0.9, "warmup_steps": 5}, ()),
        (gs.adagc, {"warmup_steps": 5, "scope": "global"}, ()),
        (gs.spike_clip, {"threshold": 20.0, "warmup_steps": 3, "reset_interval": 10}, ()),
    ],
)
def test_inject_hyperparams_gives_the_same_numbers(factory, kwargs, static):
    grads = sequence(26)
    expected_outs, expected_states = run_jitted(factory(**kwargs), grads)
    injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
    outs, states = run_jitted(injected, grads)
    assert_trees_close(outs, expected_outs, rtol=2e-5, atol=1e-7)
    assert_trees_close(states[-1].inner_state, expected_states[-1], rtol=2e-5, atol=1e-7)
    numeric = {k for k, v in kwargs.items() if k not in static and not isinstance(v, str)}
    assert numeric - {"max_norm"} <= set(states[-1].hyperparams)


def test_injected_window_must_be_static():
    tx = optax.inject_hyperparams(gs.autoclip)(percentile=10.0, window=8)
    with pytest.raises(ValueError, match="window"):
        jax.jit(tx.init)(jnp.zeros(2))


def test_injected_z_thresh_can_be_changed_mid_run():
    grads = sequence(26)
    tx = optax.inject_hyperparams(gs.zclip)(max_norm=None, warmup_steps=5, z_thresh=2.0)
    _, states = run_jitted(tx, grads[:12])
    state = states[-1]
    state.hyperparams["z_thresh"] = jnp.asarray(1e6, jnp.float32)
    _, state = jax.jit(tx.update)(grads[12], state)  # the planted spike at step 12
    assert not bool(state.inner_state.spike)
    state.hyperparams["z_thresh"] = jnp.asarray(2.0, jnp.float32)
    _, state = jax.jit(tx.update)(grads[12], state)
    assert bool(state.inner_state.spike)


def test_thresholds_accept_schedules():
    grads = sequence(30)
    # zclip: no spike can be declared once z_thresh jumps to 1e6; max_norm decays in warm-up.
    tx = gs.zclip(
        z_thresh=lambda count: jnp.where(count < 15, 2.0, 1e6),
        max_norm=lambda count: 1.0 / (1.0 + count.astype(jnp.float32)),
        warmup_steps=5,
    )
    _, states = run_jitted(tx, grads)
    assert bool(states[12].spike) and not bool(states[20].spike)
    assert [float(s.threshold) for s in states[:5]] == pytest.approx(
        [1.0 / (1 + t) for t in range(5)]
    )
    # autoclip: percentile 100 (no clipping) after step 10.
    tx = gs.autoclip(lambda count: jnp.where(count < 10, 10.0, 100.0), window=32)
    _, states = run_jitted(tx, grads)
    assert bool(states[5].clipped) and not any(bool(s.clipped) for s in states[10:])
    # adagc: a huge relative bound after warm-up never clips.
    tx = gs.adagc(relative=lambda count: jnp.where(count < 5, 1.04, 1e9), warmup_steps=5)
    _, states = run_jitted(tx, grads)
    assert not any(bool(s.clipped) for s in states[5:])
    # spike_clip: the threshold in the state follows the schedule.
    schedule = optax.linear_schedule(10.0, 100.0, 30)
    _, states = run_jitted(gs.spike_clip(schedule, warmup_steps=2), grads)
    np.testing.assert_allclose(
        [float(s.threshold) for s in states], schedule(jnp.arange(30)), rtol=1e-6
    )


# --------------------------------------------------------------------------------------------
# Stats for metrics()
# --------------------------------------------------------------------------------------------


def test_metrics_reports_every_adaptive_clipper():
    tx = optax.chain(
        gs.zclip(warmup_steps=3),
        gs.autoclip(),
        gs.adagc(warmup_steps=3),
        gs.spike_clip(warmup_steps=2),
        optax.sgd(0.1),
    )
    grads = sequence(6)
    state = tx.init(grads[0])
    for g in grads:
        _, state = jax.jit(tx.update)(g, state, grads[0])
    found = gs.metrics(state)
    expected = {
        "zclip": ("norm", "threshold", "scale", "clipped", "spike", "zscore", "mean", "var"),
        "autoclip": ("norm", "threshold", "scale", "clipped", "count", "samples"),
        "adagc": ("norm", "threshold", "scale", "clipped", "count"),
        "spike_clip": ("norm", "threshold", "clipped", "clipped_fraction", "count"),
    }
    for name, fields in expected.items():
        for field in fields:
            assert f"{name}/{field}" in found, (name, field)
            assert found[f"{name}/{field}"].shape == ()
    assert int(found["zclip/count"]) == 6
    norm = float(gs.global_norm(grads[-1]))
    assert float(found["zclip/norm"]) == pytest.approx(norm, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------------


BAD_ARGUMENTS = [
    (gs.zclip, {"alpha": 0.0}, "alpha"),
    (gs.zclip, {"alpha": 1.0}, "alpha"),
    (gs.zclip, {"alpha": 1.5}, "alpha"),
    (gs.zclip, {"z_thresh": 0.0}, "z_thresh"),
    (gs.zclip, {"z_thresh": -1.0}, "z_thresh"),
    (gs.zclip, {"max_norm": -1.0}, "max_norm"),
    (gs.zclip, {"eps": 0.0}, "eps"),
    (gs.zclip, {"warmup_steps": -1}, "warmup_steps"),
    (gs.zclip, {"warmup_steps": 2.5}, "warmup_steps"),
    (gs.zclip, {"mode": "median"}, "mode"),
    (gs.zclip, {"clip_option": "max"}, "clip_option"),
    (gs.zclip, {"clip_factor": 0.0}, "clip_factor"),
    (gs.zclip, {"axis_name": 3}, "axis_name"),
    (gs.autoclip, {"percentile": -1.0}, "percentile"),
    (gs.autoclip, {"percentile": 100.5}, "percentile"),
    (gs.autoclip, {"window": 0}, "window"),
    (gs.autoclip, {"window": 2.5}, "window"),
    (gs.autoclip, {"window": True}, "window"),
    (gs.adagc, {"relative": 0.0}, "relative"),
    (gs.adagc, {"beta": 1.0}, "beta"),
    (gs.adagc, {"beta": -0.1}, "beta"),
    (gs.adagc, {"warmup_steps": -1}, "warmup_steps"),
    (gs.adagc, {"warmup_max_norm": -1.0}, "warmup_max_norm"),
    (gs.adagc, {"scope": "tensor"}, "scope"),
    (gs.adagc, {"eps": 0.0}, "eps"),
    (gs.spike_clip, {"threshold": 0.0}, "threshold"),
    (gs.spike_clip, {"beta2": 1.0}, "beta2"),
    (gs.spike_clip, {"warmup_steps": -2}, "warmup_steps"),
    (gs.spike_clip, {"reset_interval": 0}, "reset_interval"),
]


@pytest.mark.parametrize("factory, kwargs, name", BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_them(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)
