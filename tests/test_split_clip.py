"""split_clip: release into the room under the clipper's bound, residual caps, fail-closed
numerics, axis_name and sharding (U-Clip's published rule is tested in test_splitting.py)."""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import gradsafe as gs


def run_steps(tx, grads_seq, jit=True):
    """Apply ``tx`` to each gradient in turn; returns (list of updates, list of states)."""
    state = tx.init(grads_seq[0])
    update = jax.jit(tx.update) if jit else tx.update
    outputs, states = [], []
    for grads in grads_seq:
        updates, state = update(grads, state)
        outputs.append(updates)
        states.append(state)
    return outputs, states


def norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in tree.values())))


def numpy_room(grads_seq, threshold, decay=1.0, ratio=None, rate_decay=None, explosion=None):
    """The ``release="room"`` rule with a global-norm clip, in float64 numpy."""
    residual = np.zeros_like(np.asarray(grads_seq[0], np.float64))
    bound = rate = 0.0
    outputs = []
    for g in grads_seq:
        g = np.asarray(g, np.float64)
        n = np.linalg.norm(g)
        c = g if n <= threshold else g * threshold / n
        if n > threshold:
            bound = threshold
        carried = decay * residual
        if rate_decay is not None:
            rate = rate_decay * rate + (1 - rate_decay) * float(n > threshold)
        room = max(bound - np.linalg.norm(c), 0.0) * (1 - rate)
        size = np.linalg.norm(carried)
        share = 1.0 if size <= room else room / size
        u = c + share * carried
        residual = g + carried - u
        if explosion is not None and n > explosion * threshold:  # dropped, release held back
            residual = np.zeros_like(residual)
            rate = 1.0 if rate_decay is not None else rate
        if ratio is not None and np.linalg.norm(residual) > ratio * bound:
            residual = residual * ratio * bound / np.linalg.norm(residual)
        outputs.append(u)
    return outputs, residual


@pytest.mark.parametrize(
    ("decay", "ratio", "rate_decay", "explosion"),
    [(1.0, None, None, None), (0.8, None, None, None), (1.0, 1.0, None, None),
     (0.5, 2.0, None, None), (1.0, None, 0.9, None), (0.8, 0.25, 0.5, None),
     (1.0, None, None, 2.0), (1.0, None, 0.9, 7.0), (0.8, 0.25, 0.98, 2.0)],
)  # fmt: skip
def test_room_release_matches_numpy(decay, ratio, rate_decay, explosion):
    rng = np.random.default_rng(0)
    scales = [0.3, 3.0, 0.2, 0.1, 5.0, 4.0, 0.1, 0.1, 0.1, 0.0, 0.2, 0.3]
    grads = [jnp.asarray(rng.normal(size=5) * s, jnp.float32) for s in scales]
    tx = gs.split_clip(
        gs.clip_by_global_norm(1.0),
        residual_decay=decay,
        max_residual_ratio=ratio,
        clip_rate_decay=rate_decay,
        explosion_ratio=explosion,
    )
    outputs, states = run_steps(tx, grads)
    expected, residual = numpy_room(grads, 1.0, decay, ratio, rate_decay, explosion)
    for ours, theirs in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(states[-1].residual, residual, rtol=1e-5, atol=1e-6)
    assert float(states[-1].bound) == pytest.approx(1.0, rel=1e-6)


def test_room_release_is_plain_clipping_while_gradients_stay_large():
    """A run of gradients above the threshold is clipped exactly as by the clipper alone."""
    rng = np.random.default_rng(1)
    grads = [{"w": jnp.asarray(rng.normal(size=(4, 3)) * 10, jnp.float32)} for _ in range(20)]
    plain, _ = run_steps(gs.clip_by_global_norm(1.0), grads)
    # by default these gradients (norm ~35) are explosions: nothing is carried
    for explosion, kept in [(2.0, 0.0), (None, 0.25)]:  # without the rule: capped at bound / 4
        ours, states = run_steps(gs.split_clip(explosion_ratio=explosion), grads)
        for a, b in zip(ours, plain, strict=True):
            np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)
        assert float(states[-1].residual_norm) == pytest.approx(kept, rel=1e-5, abs=0)


def test_an_explosion_drops_the_residual_and_holds_the_release_back():
    grads = [jnp.array([g]) for g in (1.5, 5.0, 1.5, 0.1)]
    ours, states = run_steps(gs.split_clip(), grads)
    # 1.5 -> 1 carries 0.25; 5 -> 1 is a shrink by more than 2: residual dropped, rate 1
    assert [float(s.residual[0]) for s in states[:2]] == [0.25, 0.0]
    assert float(states[1].clip_rate) == 1.0
    # the next moderate clip carries again, but the release waits for the rate to fall:
    # room (1 - 0.1) * (1 - 0.98) instead of all of the 0.25
    assert float(states[2].residual[0]) == pytest.approx(0.25)
    assert float(ours[3][0]) == pytest.approx(0.1 + 0.9 * 0.02, rel=1e-5)
    without, _ = run_steps(gs.split_clip(explosion_ratio=None), grads)
    assert float(without[3][0]) == pytest.approx(0.35, rel=1e-5)
    # release="always" drops an explosion's excess too
    always, states = run_steps(gs.split_clip(release="always"), [jnp.array([5.0])])
    assert float(always[0][0]) == 1.0 and float(states[0].residual[0]) == 0.0


@pytest.mark.parametrize("bad", [0.5, -1.0, math.nan])
def test_a_bad_traced_explosion_ratio_falls_back_to_the_plain_clip(bad):
    rng = np.random.default_rng(3)
    grads = [jnp.asarray(rng.normal(size=4) * s, jnp.float32) for s in (1.4, 0.2, 1.2, 0.1)]
    tx = optax.inject_hyperparams(gs.split_clip)(explosion_ratio=2.0)
    state = tx.init(grads[0])
    state.hyperparams["explosion_ratio"] = jnp.asarray(bad, jnp.float32)
    plain, _ = run_steps(gs.clip_by_global_norm(1.0), grads)
    for g, expected in zip(grads, plain, strict=True):
        out, state = jax.jit(tx.update)(g, state)
        np.testing.assert_allclose(out, expected, rtol=1e-6)  # nothing carried or released
        assert float(state.inner_state.residual_norm) == 0.0


def test_room_release_pays_the_residual_back_on_quiet_steps():
    grads = [jnp.array([10.0])] + [jnp.array([0.25])] * 5
    tx = gs.split_clip(max_residual_ratio=3.0, clip_rate_decay=None, explosion_ratio=None)
    ours, states = run_steps(tx, grads)
    assert [float(u[0]) for u in ours] == [1.0, 1.0, 1.0, 1.0, 1.0, 0.25]
    assert [float(s.residual[0]) for s in states] == [3.0, 2.25, 1.5, 0.75, 0.0, 0.0]


@given(
    hnp.arrays(np.float32, (8, 3), elements=st.floats(-1e3, 1e3, width=32)),
    st.floats(0.0, 10.0, width=32),
    st.sampled_from(["room", "always"]),
)
def test_property_update_within_bound_and_mass_conserved_without_caps(grads, threshold, release):
    tx = gs.split_clip(
        gs.clip_by_global_norm(threshold),
        release=release,
        max_residual_ratio=None,
        explosion_ratio=None,
    )

    @jax.jit
    def trajectory(grads):
        def body(state, g):
            updates, state = tx.update(g, state)
            return state, updates

        state, applied = jax.lax.scan(body, tx.init(grads[0]), grads)
        return applied, state.residual

    applied, residual = trajectory(jnp.asarray(grads))
    applied = np.asarray(applied, np.float64)
    assert np.all(np.linalg.norm(applied, axis=1) <= threshold * (1 + 1e-5) + 1e-30)
    total = applied.sum(0) + np.asarray(residual, np.float64)
    bound = 16 * np.finfo(np.float32).eps * np.abs(grads.astype(np.float64)).sum() + 1e-30
    np.testing.assert_allclose(total, grads.astype(np.float64).sum(0), rtol=0, atol=bound)


@given(
    hnp.arrays(np.float32, (6, 4), elements=st.floats(-1e4, 1e4, width=32)),
    st.floats(0.0, 3.0, width=32),
    st.sampled_from(["room", "always"]),
)
def test_property_default_cap_keeps_the_residual_within_ratio_times_bound(grads, ratio, release):
    tx = gs.split_clip(release=release, max_residual_ratio=ratio)
    state = tx.init(jnp.zeros(4))
    update = jax.jit(tx.update)
    for g in grads:
        _, state = update(jnp.asarray(g), state)
        assert float(state.residual_norm) <= ratio * float(state.bound) * (1 + 1e-5) + 1e-30


def test_finite_gradient_whose_squared_norm_overflows_is_still_clipped():
    """Fail closed: entries of 1e30 are finite, their squared norm is not."""
    grads = [jnp.array([1e30, -1e30, 3.0]), jnp.array([0.0, 0.0, 0.0])]
    for release in ("room", "always"):
        tx = gs.split_clip(gs.clip_by_value(1.0), release=release)
        outputs, states = run_steps(tx, grads)
        np.testing.assert_array_equal(outputs[0], [1.0, -1.0, 1.0])
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in outputs)
        for state in states:  # the residual was capped although its norm overflows float32
            residual = np.asarray(state.residual, np.float64)
            assert np.linalg.norm(residual) <= float(state.bound) * (1 + 1e-5)


def test_nonfinite_gradient_passes_through_and_keeps_residual_and_bound():
    tx = gs.split_clip()
    state = tx.init(jnp.zeros(2))
    _, state = tx.update(jnp.array([3.0, 4.0]), state)
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        updates, new_state = tx.update(jnp.array([bad, 1.0]), state)
        np.testing.assert_array_equal(updates, [bad, 1.0])
        np.testing.assert_array_equal(new_state.residual, state.residual)
        assert float(new_state.bound) == float(state.bound) == 1.0


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_dtypes_kept_and_int_none_leaves_pass(dtype):
    grads = {
        "w": jnp.asarray([30.0, 40.0], dtype),
        "steps": jnp.array([3], jnp.int32),
        "none": None,
    }
    tx = gs.split_clip()
    updates, state = jax.jit(tx.update)(grads, tx.init(grads))
    assert updates["w"].dtype == dtype
    assert state.residual["w"].dtype == jnp.float32
    np.testing.assert_array_equal(updates["steps"], [3])
    assert updates["none"] is None
    np.testing.assert_allclose(np.asarray(updates["w"], np.float32), [0.6, 0.8], rtol=1e-2)


def test_zero_and_empty_trees():
    tx = gs.split_clip()
    updates, state = tx.update({}, tx.init({}))
    assert updates == {} and float(state.residual_norm) == 0.0
    zeros = {"w": jnp.zeros(3)}
    updates, state = tx.update(zeros, tx.init(zeros))
    np.testing.assert_array_equal(updates["w"], np.zeros(3))
    assert float(state.bound) == 0.0


def test_jit_and_eager_agree():
    rng = np.random.default_rng(2)
    grads = [{"w": jnp.asarray(rng.normal(size=6) * s, jnp.float32)} for s in [3, 0.1, 0.2, 2]]
    eager, _ = run_steps(gs.split_clip(), grads, jit=False)
    jitted, _ = run_steps(gs.split_clip(), grads, jit=True)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)


@pytest.mark.parametrize(
    ("argument", "build"),
    [
        ("release", lambda: gs.split_clip(release="later")),
        ("max_residual_ratio", lambda: gs.split_clip(max_residual_ratio=-1.0)),
        ("max_residual_ratio", lambda: gs.split_clip(max_residual_ratio=math.nan)),
        ("residual_decay", lambda: gs.split_clip(residual_decay=2.0)),
        ("clip_rate_decay", lambda: gs.split_clip(clip_rate_decay=1.0)),
        ("clip_rate_decay", lambda: gs.split_clip(clip_rate_decay=lambda step: 0.9)),
        ("explosion_ratio", lambda: gs.split_clip(explosion_ratio=0.5)),
        ("explosion_ratio", lambda: gs.split_clip(explosion_ratio=math.inf)),
        ("explosion_ratio", lambda: gs.split_clip(explosion_ratio="2")),
        ("axis_name", lambda: gs.split_clip(axis_name=3)),
    ],
)
def test_bad_arguments_name_the_argument(argument, build):
    with pytest.raises(ValueError, match=argument):
        build()


@pytest.mark.parametrize("rate_decay", [1.5, -0.5, math.nan])
def test_traced_out_of_range_clip_rate_decay_never_lets_the_update_past_the_bound(rate_decay):
    """Under inject_hyperparams the decay is traced and unchecked: a value outside [0, 1) is
    clamped, so the hold-back never widens the room under the bound."""
    grads = [jnp.array([3.0, 0.0]), jnp.array([0.0, 0.5]), jnp.array([0.0, 0.5])]

    @jax.jit
    def run(decay):
        tx = gs.split_clip(gs.clip_by_global_norm(1.0), clip_rate_decay=decay)
        state, outputs = tx.init(grads[0]), []
        for g in grads:
            u, state = tx.update(g, state)
            outputs.append(u)
        return outputs, state

    outputs, state = run(jnp.float32(rate_decay))
    for u in outputs:
        assert float(jnp.linalg.norm(u)) <= 1.0 + 1e-6
    assert 0.0 <= float(state.clip_rate) <= 1.0


def test_default_clipper_gets_the_axis_name_inside_shard_map():
    """Issue 12 item 3: on 8 devices the default clipper's norm covers the whole gradient."""
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    grads = {"w": jnp.arange(1.0, 17.0)}  # 2 entries per device, global norm ~38.7
    tx = gs.split_clip(axis_name="d")
    state = tx.init(grads)
    state_specs = jax.tree.map(lambda _: P(), state)
    state_specs = state_specs._replace(residual={"w": P("d")})
    step = jax.jit(
        jax.shard_map(
            tx.update,
            mesh=mesh,
            in_specs=({"w": P("d")}, state_specs),
            out_specs=({"w": P("d")}, state_specs),
        )
    )
    updates, state = step(grads, state)
    assert norm(updates) == pytest.approx(1.0, rel=1e-5)
    assert float(state.clip_state.norm) == pytest.approx(norm(grads), rel=1e-5)
    assert float(state.bound) == pytest.approx(1.0, rel=1e-5)


def test_residual_follows_the_parameter_sharding_under_an_explicit_mesh():
    """Issue 12 item 10: the residual buffers are made with zeros_like of the leaves."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        params = {
            "w": jax.device_put(jnp.ones((16, 4)), jax.NamedSharding(mesh, P("x", None))),
            "b": jax.device_put(jnp.ones((4,)), jax.NamedSharding(mesh, P())),
        }
        tx = gs.split_clip()
        state = jax.jit(tx.init)(params)
        grads = jax.tree.map(lambda p: p * 3.0, params)
        updates, state = jax.jit(tx.update)(grads, state)
        for name, p in params.items():
            assert state.residual[name].sharding.is_equivalent_to(p.sharding, p.ndim)
            assert updates[name].sharding.is_equivalent_to(p.sharding, p.ndim)
        assert state.residual["w"].sharding.spec == P("x", None)
    assert norm(updates) == pytest.approx(1.0, rel=1e-5)
