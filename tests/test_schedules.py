"""Threshold decay: every threshold-bearing transform accepts an Optax schedule ``step -> value``.

Each test runs a transform whose threshold is a schedule and checks that, at every step, it
acts exactly as the same transform built with the constant ``schedule(step)``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradsafe as gs


def halving(start):
    """``start * 0.5**step``: a schedule with only explicit float32 arithmetic."""
    return lambda step: jnp.float32(start) * jnp.float32(0.5) ** jnp.asarray(step, jnp.float32)


def tolerant(schedule):
    """An Optax schedule run under standard promotion (conftest makes promotion strict, and
    Optax's schedules mix int and float internally)."""

    def wrapped(step):
        with jax.numpy_dtype_promotion("standard"):
            return schedule(step)

    return wrapped


SCHEDULES = {
    "halving": halving(4.0),
    "optax_linear": tolerant(optax.linear_schedule(4.0, 0.25, transition_steps=5)),
    "optax_piecewise": tolerant(optax.piecewise_constant_schedule(4.0, {2: 0.25, 4: 4.0})),
}

GRADS = {"w": jnp.array([[3.0, -4.0], [1.0, 2.0]]), "b": jnp.array([0.5, -6.0])}
PARAMS = {"w": jnp.array([[1.0, 2.0], [-1.0, 0.5]]), "b": jnp.array([2.0, 1.0])}

# name -> (factory of the threshold, name of the state field holding the threshold or None)
FIXED_CLIPPERS = {
    "clip_by_value": (gs.clip_by_value, "threshold"),
    "clip_by_global_norm": (gs.clip_by_global_norm, "threshold"),
    "clip_by_global_norm_torch": (
        lambda c: gs.clip_by_global_norm(c, semantics="torch"),
        "threshold",
    ),
    "clip_by_leaf_norm": (gs.clip_by_leaf_norm, "threshold"),
    "clip_by_block_rms": (gs.clip_by_block_rms, "threshold"),
    "adaptive_grad_clip": (gs.adaptive_grad_clip, None),
}


def assert_trees_close(a, b, rtol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7), a, b)


@pytest.mark.parametrize("schedule_name", SCHEDULES)
@pytest.mark.parametrize("name", FIXED_CLIPPERS)
def test_fixed_clipper_threshold_follows_the_schedule(name, schedule_name):
    make, field = FIXED_CLIPPERS[name]
    schedule = SCHEDULES[schedule_name]
    tx = make(schedule)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    clipped_any = set()
    for step in range(6):
        value = float(schedule(step))
        updates, state = update(GRADS, state, PARAMS)
        constant = make(value)
        expected, _ = constant.update(GRADS, constant.init(PARAMS), PARAMS)
        assert_trees_close(updates, expected)
        if field is not None:
            assert float(getattr(state, field)) == pytest.approx(value, rel=1e-6)
        clipped_any.add(round(float(gs.global_norm(updates)), 4))
    assert len(clipped_any) > 1  # the schedule changed what was done


def test_fixed_clipper_schedule_inside_scan():
    """A schedule inside ``lax.scan``: the threshold is looked up from the traced count."""
    tx = gs.clip_by_global_norm(halving(8.0))

    def body(state, _):
        updates, state = tx.update(GRADS, state)
        return state, (gs.global_norm(updates), state.threshold)

    _, (norms, thresholds) = jax.jit(lambda s: jax.lax.scan(body, s, None, length=6))(
        tx.init(GRADS)
    )
    expected = [min(float(gs.global_norm(GRADS)), 8.0 * 0.5**t) for t in range(6)]
    np.testing.assert_allclose(norms, expected, rtol=1e-6)
    np.testing.assert_allclose(thresholds, [8.0 * 0.5**t for t in range(6)], rtol=1e-6)


# ------------------------------------------------------------------------------------------
# splitting and decay transforms
# ------------------------------------------------------------------------------------------


def test_split_clip_clipper_and_residual_cap_follow_schedules():
    cap = halving(4.0)
    tx = gs.split_clip(gs.clip_by_global_norm(halving(2.0)), max_residual_norm=cap)
    state = tx.init(GRADS)
    update = jax.jit(tx.update)
    for step in range(6):
        updates, state = update(GRADS, state)
        assert float(gs.global_norm(updates)) <= 2.0 * 0.5**step * (1 + 1e-6)
        assert float(state.clip_state.threshold) == pytest.approx(2.0 * 0.5**step)
        assert float(state.residual_norm) <= 4.0 * 0.5**step * (1 + 1e-6)
        np.testing.assert_allclose(gs.global_norm(state.residual), state.residual_norm, rtol=1e-5)


def test_split_clip_residual_decay_follows_a_schedule():
    decay = tolerant(optax.linear_schedule(1.0, 0.0, transition_steps=4))
    grads = [jnp.array([5.0, -3.0]) for _ in range(6)]
    tx = gs.split_clip(
        gs.clip_by_value(1.0),
        residual_decay=decay,
        release="always",
        max_residual_ratio=None,
        explosion_ratio=None,
    )
    state = tx.init(grads[0])
    residual = np.zeros(2)
    for step, g in enumerate(grads):
        updates, state = jax.jit(tx.update)(g, state)
        combined = np.asarray(g, np.float64) + float(decay(step)) * residual
        expected = np.clip(combined, -1.0, 1.0)
        residual = combined - expected
        np.testing.assert_allclose(updates, expected, rtol=1e-6)
        np.testing.assert_allclose(state.residual, residual, rtol=1e-6, atol=1e-6)


def test_decay_follows_a_schedule():
    schedule = SCHEDULES["optax_piecewise"]
    tx = gs.decay(schedule)
    state = tx.init(GRADS)
    for step in range(6):
        updates, state = jax.jit(tx.update)(GRADS, state)
        value = float(schedule(step))
        expected = jax.tree.map(lambda g, value=value: g * value, GRADS)
        assert_trees_close(updates, expected)


def test_cooldown_threshold_and_factor_follow_schedules():
    """The same norm is a spike while the z threshold is low, and not once it is high."""

    def z_thresh(step):
        return jnp.where(step < 6, jnp.float32(2.0), jnp.float32(1e6))

    def factor(step):
        return jnp.float32(0.01) * (jnp.asarray(step, jnp.float32) + 1)

    tx = gs.cooldown_on_spike(z_thresh=z_thresh, factor=factor, warmup_steps=4, recovery_steps=0)
    norms = [1.0, 1.2, 0.8, 1.0, 5.0, 1.0, 1.0, 5.0]
    state = tx.init(jnp.zeros(1))
    spikes, scales = [], []
    for n in norms:
        _, state = jax.jit(tx.update)(jnp.array([n]), state)
        spikes.append(bool(state.spike))
        scales.append(float(state.scale))
    assert spikes == [False] * 4 + [True, False, False, False]
    assert scales[4] == pytest.approx(0.05)  # factor(4)
    assert all(s == 1.0 for i, s in enumerate(scales) if i != 4)
    assert math.isfinite(float(state.z)) and float(state.z) > 2.0  # a spike for threshold 2


def test_schedules_survive_inject_hyperparams_static_callables():
    """Callables passed to ``inject_hyperparams`` are schedules of the injected count."""
    tx = optax.inject_hyperparams(gs.clip_by_global_norm)(max_norm=halving(4.0))
    state = tx.init(GRADS)
    for step in range(3):
        updates, state = jax.jit(tx.update)(GRADS, state)
        np.testing.assert_allclose(gs.global_norm(updates), 4.0 * 0.5**step, rtol=1e-6)
