"""Decay family: decay(schedule) and cooldown_on_spike."""

import math

import flax.serialization
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from adaptive_cases import run_steps
from hypothesis import given
from hypothesis import strategies as st

import gradsafe as gs

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def tolerant(schedule):
    """An Optax schedule run under standard promotion (Optax's schedules mix int and float;
    conftest makes promotion strict to catch gradsafe's own implicit promotions)."""

    def wrapped(step):
        with jax.numpy_dtype_promotion("standard"):
            return schedule(step)

    return wrapped


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def scalar_grads(norms):
    """One-entry gradients whose global norms are ``norms``."""
    return [jnp.array([n], jnp.float32) for n in norms]


def numpy_cooldown(norms, z_thresh=4.0, factor=0.1, recovery_steps=100, alpha=0.97, warmup=25):
    """cooldown_on_spike's factors and spike flags, in float64 numpy, from its docstring."""
    mean = var = 0.0
    samples, since = 0, None
    scales, spikes = [], []
    for n in norms:
        spike = False
        if math.isfinite(n):
            if samples < warmup:  # Welford
                delta = n - mean
                mean += delta / (samples + 1)
                var += (delta * (n - mean) - var) / (samples + 1)
            else:
                std = math.sqrt(var)
                spike = (n - mean) / (std + 1e-6) > z_thresh
                x = mean + z_thresh * std if spike else n
                delta = x - mean
                mean += (1 - alpha) * delta
                var = alpha * (var + (1 - alpha) * delta**2)
            samples += 1
        since = 0 if spike else (None if since is None else since + 1)
        if since is not None and since < max(recovery_steps, 1):
            progress = since / max(recovery_steps, 1)
            scales.append(factor + (1 - factor) * (1 - math.cos(math.pi * progress)) / 2)
        else:
            scales.append(1.0)
        spikes.append(spike)
    return np.array(scales), np.array(spikes)


TRANSFORMS = {
    "decay": lambda: gs.decay(tolerant(optax.cosine_decay_schedule(1.0, 10))),
    "decay_constant": lambda: gs.decay(0.5),
    "cooldown_on_spike": lambda: gs.cooldown_on_spike(warmup_steps=2, recovery_steps=3),
}

# ------------------------------------------------------------------------------------------
# decay
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule",
    [
        tolerant(optax.linear_schedule(1.0, 0.1, 5)),
        tolerant(optax.exponential_decay(2.0, 1, 0.5)),
        tolerant(optax.piecewise_constant_schedule(1.0, {2: 0.5, 4: 0.0})),
    ],
)
def test_decay_multiplies_by_the_schedule(schedule):
    grads = {"w": jnp.array([1.0, -2.0]), "h": jnp.array([4.0], jnp.bfloat16)}
    outputs, states = run_steps(gs.decay(schedule), [grads] * 7)
    for step, (updates, state) in enumerate(zip(outputs, states, strict=True)):
        factor = float(schedule(step))
        np.testing.assert_allclose(updates["w"], np.array([1.0, -2.0]) * factor, rtol=1e-6)
        assert updates["h"].dtype == jnp.bfloat16
        np.testing.assert_allclose(float(updates["h"][0]), 4.0 * factor, rtol=1e-2)
        assert float(state.scale) == pytest.approx(factor, rel=1e-6)
        assert int(state.count) == step + 1
    assert float(gs.metrics(states[-1])["decay/scale"]) == pytest.approx(float(schedule(6)))


def test_decay_constant_and_matches_optax_scale_by_schedule():
    grads = {"w": jnp.array([1.0, -2.0, 3.0])}
    outputs, _ = run_steps(gs.decay(0.25), [grads])
    np.testing.assert_array_equal(outputs[0]["w"], [0.25, -0.5, 0.75])
    schedule = tolerant(optax.cosine_decay_schedule(1.0, 4))
    ours, _ = run_steps(gs.decay(schedule), [grads] * 5)
    ref = optax.scale_by_schedule(schedule)
    state = ref.init(grads)
    for updates in ours:
        with jax.numpy_dtype_promotion("standard"):
            theirs, state = ref.update(grads, state)
        np.testing.assert_allclose(updates["w"], theirs["w"], rtol=1e-6)


def test_decay_under_inject_hyperparams():
    tx = optax.inject_hyperparams(gs.decay)(schedule=0.5)
    state = tx.init(jnp.zeros(2))
    updates, state = tx.update(jnp.ones(2), state)
    np.testing.assert_array_equal(updates, [0.5, 0.5])
    state.hyperparams["schedule"] = jnp.asarray(0.1)
    updates, _ = jax.jit(tx.update)(jnp.ones(2), state)
    np.testing.assert_allclose(updates, [0.1, 0.1], rtol=1e-6)


# ------------------------------------------------------------------------------------------
# cooldown_on_spike
# ------------------------------------------------------------------------------------------


def test_cooldown_ramps_back_along_a_cosine():
    norms = [1.0, 1.2, 0.8, 1.0, 30.0] + [1.0] * 6
    outputs, states = run_steps(
        gs.cooldown_on_spike(warmup_steps=4, recovery_steps=4, factor=0.2),
        scalar_grads(norms),
    )
    scales = [float(s.scale) for s in states]
    ramp = [0.2 + 0.8 * (1 - math.cos(math.pi * j / 4)) / 2 for j in range(4)]
    np.testing.assert_allclose(scales, [1.0] * 4 + ramp + [1.0] * 3, rtol=1e-6)
    assert [bool(s.spike) for s in states] == [False] * 4 + [True] + [False] * 6
    for n, updates, scale in zip(norms, outputs, scales, strict=True):
        np.testing.assert_allclose(float(updates[0]), n * scale, rtol=1e-6)
    assert int(states[-1].spikes) == 1
    assert float(states[4].z) > 4.0


def test_cooldown_matches_numpy_reference_on_a_long_noisy_run():
    rng = np.random.default_rng(0)
    norms = np.abs(rng.normal(1.0, 0.1, size=300))
    norms[[60, 61, 150, 170, 240]] *= [20, 30, 8, 50, 3]
    norms[100] = np.nan
    norms[200] = np.inf
    kwargs = {"z_thresh": 3.0, "factor": 0.05, "recovery_steps": 20, "warmup": 25}
    expected_scales, expected_spikes = numpy_cooldown(list(norms), **kwargs)
    kwargs["warmup_steps"] = kwargs.pop("warmup")
    tx = gs.cooldown_on_spike(**kwargs)

    def body(state, g):
        _, state = tx.update(g, state)
        return state, (state.scale, state.spike)

    _, (scales, spikes) = jax.jit(lambda s, g: jax.lax.scan(body, s, g))(
        tx.init(jnp.zeros(1)), jnp.asarray(norms[:, None], jnp.float32)
    )
    np.testing.assert_array_equal(np.asarray(spikes), expected_spikes)
    assert expected_spikes.sum() >= 4
    np.testing.assert_allclose(np.asarray(scales), expected_scales, rtol=1e-5, atol=1e-6)


def test_cooldown_warmup_never_detects():
    norms = [1.0, 1000.0, 1.0, 1e6, 1.0]
    _, states = run_steps(gs.cooldown_on_spike(warmup_steps=5), scalar_grads(norms))
    assert not any(bool(s.spike) for s in states)
    assert all(float(s.scale) == 1.0 and float(s.z) == 0.0 for s in states)
    np.testing.assert_allclose(float(states[-1].mean), np.mean(norms), rtol=1e-6)
    np.testing.assert_allclose(float(states[-1].var), np.var(norms), rtol=1e-5)


def test_cooldown_new_spike_restarts_the_ramp_and_zero_recovery_steps():
    norms = [1.0, 1.1, 0.9, 50.0, 1.0, 80.0, 1.0]
    _, states = run_steps(
        gs.cooldown_on_spike(warmup_steps=3, recovery_steps=4, factor=0.0), scalar_grads(norms)
    )
    assert [float(s.scale) for s in states][3:] == pytest.approx([0.0, 0.14644661, 0.0, 0.14644661])
    _, states = run_steps(
        gs.cooldown_on_spike(warmup_steps=3, recovery_steps=0, factor=0.5), scalar_grads(norms)
    )
    assert [float(s.scale) for s in states] == [1.0, 1.0, 1.0, 0.5, 1.0, 0.5, 1.0]


def test_cooldown_follows_a_lasting_rise_in_the_norm():
    norms = [1.0 + 0.01 * (i % 3) for i in range(10)] + [10.0] * 300
    _, states = run_steps(
        gs.cooldown_on_spike(warmup_steps=10, recovery_steps=5), scalar_grads(norms)
    )
    spikes = [bool(s.spike) for s in states]
    assert spikes[10]
    assert not any(spikes[-100:])
    assert float(states[-1].scale) == 1.0
    np.testing.assert_allclose(float(states[-1].mean), 10.0, rtol=1e-2)


def test_cooldown_nonfinite_norm_is_recorded_not_a_spike_and_kept_out_of_statistics():
    tx = gs.cooldown_on_spike(warmup_steps=2)
    _, states = run_steps(tx, scalar_grads([1.0, 2.0]))
    state = states[-1]
    for bad in (jnp.nan, jnp.inf):
        updates, new_state = tx.update(jnp.array([bad, 1.0]), state)
        assert not bool(new_state.spike) and float(new_state.z) == 0.0
        assert not math.isfinite(float(new_state.norm))
        assert float(new_state.mean) == float(state.mean)
        assert float(new_state.var) == float(state.var)
        assert int(new_state.samples) == int(state.samples)
        assert not bool(jnp.all(jnp.isfinite(updates)))  # visible to a guard


@given(
    hnp.arrays(np.float32, (40,), elements=st.floats(0.0, 1e4, width=32)),
    st.floats(0.0, 1.0, width=32),
)
def test_cooldown_property_scale_between_factor_and_one(norms, factor):
    _, scales = cooldown_trajectory(jnp.asarray(norms)[:, None], jnp.float32(factor))
    scales = np.asarray(scales)
    assert np.all(scales >= factor * (1 - 1e-6)) and np.all(scales <= 1.0)


@given(st.floats(0.0009765625, 1024.0, width=32))
def test_cooldown_property_constant_norms_never_spike(norm):
    spikes, scales = cooldown_trajectory(jnp.full((40, 1), norm), jnp.float32(0.1))
    assert not np.any(np.asarray(spikes)) and np.all(np.asarray(scales) == 1.0)


@jax.jit
def cooldown_trajectory(grads, factor):
    tx = gs.cooldown_on_spike(factor=factor, warmup_steps=5, recovery_steps=7)

    def body(state, g):
        _, state = tx.update(g, state)
        return state, (state.spike, state.scale)

    return jax.lax.scan(body, tx.init(grads[0]), grads)[1]


def test_cooldown_metrics():
    _, states = run_steps(gs.cooldown_on_spike(warmup_steps=2), scalar_grads([1.0, 1.0, 9.0]))
    stats = gs.metrics(states[-1])
    assert bool(stats["cooldown_on_spike/spike"]) and int(stats["cooldown_on_spike/spikes"]) == 1
    assert float(stats["cooldown_on_spike/scale"]) == pytest.approx(0.1)
    assert float(stats["cooldown_on_spike/norm"]) == 9.0


# ------------------------------------------------------------------------------------------
# bad arguments
# ------------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    ("schedule", lambda: gs.decay("cosine")),
    ("schedule", lambda: gs.decay(float("nan"))),
    ("schedule", lambda: gs.decay(jnp.ones(3))),
    ("z_thresh", lambda: gs.cooldown_on_spike(z_thresh=0.0)),
    ("z_thresh", lambda: gs.cooldown_on_spike(z_thresh=-1.0)),
    ("factor", lambda: gs.cooldown_on_spike(factor=1.5)),
    ("factor", lambda: gs.cooldown_on_spike(factor=-0.1)),
    ("recovery_steps", lambda: gs.cooldown_on_spike(recovery_steps=-1)),
    ("recovery_steps", lambda: gs.cooldown_on_spike(recovery_steps=2.5)),
    ("alpha", lambda: gs.cooldown_on_spike(alpha=1.0)),
    ("alpha", lambda: gs.cooldown_on_spike(alpha=0.0)),
    ("alpha", lambda: gs.cooldown_on_spike(alpha=lambda step: 0.9)),
    ("warmup_steps", lambda: gs.cooldown_on_spike(warmup_steps=0)),
    ("warmup_steps", lambda: gs.cooldown_on_spike(warmup_steps=True)),
    ("axis_name", lambda: gs.cooldown_on_spike(axis_name=0)),
]


@pytest.mark.parametrize("name,make", BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_them(name, make):
    with pytest.raises(ValueError, match=name):
        make()


# ------------------------------------------------------------------------------------------
# edge matrix
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRANSFORMS)
def test_int_none_and_low_precision_leaves(name):
    tree = {
        "i": jnp.arange(2),
        "n": None,
        "h": jnp.full(3, 3e4, jnp.float16),
        "b": jnp.full(2, 1e18, jnp.bfloat16),
    }
    outputs, states = run_steps(TRANSFORMS[name](), [tree] * 4)
    for updates in outputs:
        assert updates["n"] is None
        np.testing.assert_array_equal(updates["i"], np.arange(2))
        assert updates["h"].dtype == jnp.float16 and updates["b"].dtype == jnp.bfloat16
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in (updates["h"], updates["b"]))
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in gs.metrics(states[-1]).values())


@pytest.mark.parametrize("name", TRANSFORMS)
def test_zero_gradients_give_zeros(name):
    zeros = {"w": jnp.zeros(3)}
    outputs, states = run_steps(TRANSFORMS[name](), [zeros] * 5)
    for updates in outputs:
        assert_trees_equal(updates, zeros)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in gs.metrics(states[-1]).values())


@pytest.mark.parametrize("name", TRANSFORMS)
def test_nonfinite_passes_through_and_later_steps_recover(name):
    good = {"w": jnp.array([0.5, 1.0])}
    bad = {"w": jnp.array([jnp.nan, 1.0])}
    outputs, _ = run_steps(TRANSFORMS[name](), [good, good, bad, good, good])
    assert np.isnan(outputs[2]["w"][0])
    assert all(bool(jnp.all(jnp.isfinite(u["w"]))) for u in outputs[3:])


@pytest.mark.parametrize("name", TRANSFORMS)
def test_checkpoint_round_trip_mid_run_continues_identically(name):
    grads = scalar_grads([1.0, 1.1, 0.9, 40.0, 1.0, 1.0, 3.0])
    tx = TRANSFORMS[name]()
    update = jax.jit(tx.update)
    state = tx.init(grads[0])
    for g in grads[:4]:
        _, state = update(g, state)
    restored = flax.serialization.from_bytes(tx.init(grads[0]), flax.serialization.to_bytes(state))
    for g in grads[4:]:
        a, state = update(g, state)
        b, restored = update(g, restored)
        assert_trees_equal(a, b)
    assert_trees_equal(state, restored)


def test_cooldown_under_inject_hyperparams():
    grads = scalar_grads([1.0, 1.1, 0.9, 40.0, 1.0, 1.0])
    kwargs = {"z_thresh": 3.0, "factor": 0.2, "recovery_steps": 3, "warmup_steps": 3}
    plain, _ = run_steps(gs.cooldown_on_spike(**kwargs), grads)
    injected, _ = run_steps(optax.inject_hyperparams(gs.cooldown_on_spike)(**kwargs), grads)
    for a, b in zip(plain, injected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_cooldown_shard_map_gives_the_single_device_result():
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(3)
    grads = [
        {"a": jnp.asarray(rng.normal(size=(16, 2)) * s, jnp.float32), "b": jnp.ones(3)}
        for s in [1.0] * 6 + [40.0, 1.0, 1.0, 30.0, 1.0]
    ]
    kwargs = {"warmup_steps": 4, "recovery_steps": 3}
    _, single = run_steps(gs.cooldown_on_spike(**kwargs), grads)
    assert sum(bool(s.spike) for s in single) == 2
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    tx = gs.cooldown_on_spike(axis_name="d", **kwargs)
    state = tx.init(grads[0])
    grad_specs = {"a": P("d"), "b": P()}
    state_specs = jax.tree.map(lambda _: P(), state)
    step = jax.jit(
        jax.shard_map(
            tx.update,
            mesh=mesh,
            in_specs=(grad_specs, state_specs),
            out_specs=(grad_specs, state_specs),
        )
    )
    for g, expected in zip(grads, single, strict=True):
        g = jax.tree.map(lambda x, s: jax.device_put(x, jax.NamedSharding(mesh, s)), g, grad_specs)
        _, state = step(g, state)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5), state, expected)
