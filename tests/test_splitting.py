"""Splitting family: split_clip (U-Clip), split_magnitude (AdaGN), split_by_path, accumulate."""

import math

import flax.serialization
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gradsafe as gs

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def run_steps(tx, grads_seq, params=None, jit=True, **extra):
    """Apply ``tx`` to each gradient in turn; returns (list of updates, final state)."""
    params = grads_seq[0] if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    outputs = []
    for grads in grads_seq:
        updates, state = update(grads, state, params, **extra)
        outputs.append(updates)
    return outputs, state


def assert_trees_close(a, b, rtol=1e-6, atol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def standard_promotion():
    """Optax's own code relies on implicit promotion (conftest makes it strict)."""
    return jax.numpy_dtype_promotion("standard")


def scale_by_value():
    """A test transform: multiplies updates by the extra arg ``value`` and keeps it in state."""

    def init_fn(params):
        del params
        return {"value": jnp.zeros([], jnp.float32)}

    def update_fn(updates, state, params=None, *, value, **extra_args):
        del params, extra_args
        value = jnp.asarray(value, jnp.float32)
        return gs._numerics.scale_tree(updates, value), {"value": value}

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def random_grads(seed, steps, shapes, scale=1.0, spikes=()):
    rng = np.random.default_rng(seed)
    seq = []
    for t in range(steps):
        factor = 100.0 if t in spikes else 1.0
        seq.append(
            {
                name: jnp.asarray(rng.normal(size=shape) * scale * factor, jnp.float32)
                for name, shape in shapes.items()
            }
        )
    return seq


SHAPES = {"w": (3, 4), "b": (4,)}

# All transforms of this module, built with small settings, for the shared edge matrix.
TRANSFORMS = {
    "split_clip": lambda: gs.split_clip(),
    "split_clip_value": lambda: gs.split_clip(
        gs.clip_by_value(0.5), residual_decay=0.9, max_residual_norm=2.0
    ),
    "split_magnitude": lambda: gs.split_magnitude(),
    "split_by_path": lambda: gs.split_by_path(
        {"^w": gs.clip_by_global_norm(1.0)}, default=gs.clip_by_value(0.5)
    ),
    "accumulate": lambda: gs.accumulate(
        gs.clip_by_global_norm(1.0), 2, clip_each=gs.clip_by_global_norm(0.5)
    ),
}

# ------------------------------------------------------------------------------------------
# split_clip
# ------------------------------------------------------------------------------------------


def numpy_uclip(grads_seq, clip, decay=1.0):
    """U-Clip in float64 numpy: u = clip(g + decay * r), r = g + decay * r - u."""
    residual = np.zeros_like(np.asarray(grads_seq[0], np.float64))
    outputs = []
    for g in grads_seq:
        combined = np.asarray(g, np.float64) + decay * residual
        applied = clip(combined)
        residual = combined - applied
        outputs.append(applied)
    return outputs, residual


def test_split_clip_conserves_gradient_mass_over_1000_steps():
    steps, size = 1000, 8
    rng = np.random.default_rng(0)
    grads = rng.standard_cauchy(size=(steps, size)).astype(np.float32)  # heavy tails: spikes
    tx = gs.split_clip(gs.clip_by_global_norm(1.0), max_residual_ratio=None, explosion_ratio=None)

    def body(state, g):
        updates, state = tx.update(g, state)
        return state, updates

    state, applied = jax.jit(lambda s, g: jax.lax.scan(body, s, g))(
        tx.init(jnp.zeros(size)), jnp.asarray(grads)
    )
    applied = np.asarray(applied, np.float64)
    assert np.max(np.linalg.norm(applied, axis=1)) <= 1.0 + 1e-6  # every update clipped
    assert float(state.residual_norm) > 1.0  # the big gradients are still being paid out
    total_applied = applied.sum(0) + np.asarray(state.residual, np.float64)
    total_grads = grads.astype(np.float64).sum(0)
    # Each step rounds v = g + r and r = v - u once in float32.
    bound = 4 * np.finfo(np.float32).eps * np.sum(np.abs(grads.astype(np.float64))) + 1e-5
    np.testing.assert_allclose(total_applied, total_grads, rtol=0, atol=bound)


def test_split_clip_conserves_mass_for_bf16_gradients():
    rng = np.random.default_rng(1)
    grads = [jnp.asarray(rng.normal(size=6) * 5, jnp.bfloat16) for _ in range(50)]
    outputs, state = run_steps(
        gs.split_clip(gs.clip_by_value(1.0), max_residual_ratio=None, explosion_ratio=None), grads
    )
    assert all(u.dtype == jnp.bfloat16 for u in outputs)
    total = sum(np.asarray(u, np.float64) for u in outputs) + np.asarray(state.residual)
    expected = sum(np.asarray(g, np.float64) for g in grads)
    np.testing.assert_allclose(total, expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_split_clip_matches_numpy_uclip_with_value_clipping(decay):
    rng = np.random.default_rng(2)
    grads = [jnp.asarray(rng.normal(size=5) * 2, jnp.float32) for _ in range(20)]
    tx = gs.split_clip(
        gs.clip_by_value(1.0),
        residual_decay=decay,
        release="always",
        max_residual_ratio=None,
        explosion_ratio=None,
    )
    outputs, state = run_steps(tx, grads)
    expected, residual = numpy_uclip(grads, lambda v: np.clip(v, -1, 1), decay)
    for ours, theirs in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.residual, residual, rtol=1e-5, atol=1e-5)


def test_split_clip_matches_numpy_uclip_with_global_norm_clipping():
    grads = random_grads(3, 15, {"w": (6,)}, scale=2.0, spikes=(4, 9))
    outputs, _ = run_steps(
        gs.split_clip(release="always", max_residual_ratio=None, explosion_ratio=None), grads
    )

    def clip(v):
        norm = np.linalg.norm(v)
        return v if norm <= 1.0 else v / norm

    expected, _ = numpy_uclip([g["w"] for g in grads], clip)
    for ours, theirs in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(ours["w"], theirs, rtol=1e-5, atol=1e-6)


def test_split_clip_with_zero_decay_is_plain_clipping():
    grads = random_grads(4, 10, SHAPES, scale=3.0)
    ours, _ = run_steps(gs.split_clip(residual_decay=0.0), grads)
    plain, _ = run_steps(gs.clip_by_global_norm(1.0), grads)
    for a, b in zip(ours, plain, strict=True):
        assert_trees_close(a, b, rtol=1e-6)


def test_split_clip_residual_cap_bounds_the_residual():
    grads = random_grads(5, 30, SHAPES, scale=10.0)
    tx = gs.split_clip(max_residual_norm=0.5)
    state = tx.init(grads[0])
    for g in grads:
        _, state = jax.jit(tx.update)(g, state)
        assert float(state.residual_norm) <= 0.5 * (1 + 1e-6)
        assert math.isclose(
            gs.global_norm(state.residual), float(state.residual_norm), rel_tol=1e-5
        )


def test_split_clip_delays_a_spike_instead_of_dropping_it():
    grads = [jnp.array([10.0])] + [jnp.array([0.0])] * 12
    tx = gs.split_clip(max_residual_ratio=None, explosion_ratio=None, clip_rate_decay=None)
    outputs, state = run_steps(tx, grads)
    applied = [float(u[0]) for u in outputs]
    assert applied[:10] == [1.0] * 10 and applied[10:] == [0.0] * 3
    assert float(state.residual[0]) == 0.0


def test_split_clip_keeps_residual_on_nonfinite_gradient():
    tx = gs.split_clip(
        gs.clip_by_value(1.0), max_residual_ratio=1.0, clip_rate_decay=None, explosion_ratio=None
    )
    state = tx.init(jnp.zeros(2))
    _, state = tx.update(jnp.array([3.0, 0.0]), state)
    before = np.asarray(state.residual)
    for bad in (jnp.nan, jnp.inf):
        updates, new_state = tx.update(jnp.array([bad, 1.0]), state)
        np.testing.assert_array_equal(new_state.residual, before)
        np.testing.assert_array_equal(updates, [bad, 1.0])  # as it came, for a guard
        assert not math.isfinite(float(new_state.norm))
    updates, state = tx.update(jnp.array([0.0, 0.0]), new_state)
    np.testing.assert_array_equal(updates, [1.0, 0.0])


def test_split_clip_passes_params_and_extra_args_to_the_clipper():
    params = {"w": jnp.ones(4)}
    grads = {"w": jnp.full(4, 10.0)}
    tx = gs.split_clip(gs.adaptive_grad_clip(0.1), max_residual_ratio=None, explosion_ratio=None)
    updates, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], np.full(4, 0.1), rtol=1e-6)
    np.testing.assert_allclose(state.residual["w"], np.full(4, 9.9), rtol=1e-6)
    with pytest.raises(ValueError, match="params"):
        tx.update(grads, tx.init(params))
    tx = gs.split_clip(scale_by_value())
    updates, _ = tx.update(grads, tx.init(params), value=0.5)
    np.testing.assert_allclose(updates["w"], np.full(4, 5.0))


def test_split_clip_default_clipper_and_metrics():
    grads = {"w": jnp.array([3.0, 4.0])}
    _, state = run_steps(gs.split_clip(max_residual_ratio=None, explosion_ratio=None), [grads])
    stats = gs.metrics(state)
    assert float(stats["clip_by_global_norm/threshold"]) == 1.0
    assert float(stats["split_clip/norm"]) == 5.0
    np.testing.assert_allclose(float(stats["split_clip/residual_norm"]), 4.0, rtol=1e-6)
    assert int(stats["split_clip/count"]) == 1
    np.testing.assert_allclose(float(stats["split_clip/bound"]), 1.0, rtol=1e-6)


@jax.jit
def uclip_trajectory(grads, threshold):
    """U-Clip (``release="always"``, no cap) with clip_by_global_norm(threshold)."""
    tx = gs.split_clip(
        gs.clip_by_global_norm(threshold),
        release="always",
        max_residual_ratio=None,
        explosion_ratio=None,
    )

    def body(state, g):
        updates, state = tx.update(g, state)
        return state, updates

    state, applied = jax.lax.scan(body, tx.init(grads[0]), grads)
    return applied, state.residual


@given(
    hnp.arrays(np.float32, (6, 4), elements=st.floats(-1e3, 1e3, width=32)),
    st.floats(0.0, 10.0, width=32),
)
def test_split_clip_property_sum_is_conserved(grads, threshold):
    applied, residual = uclip_trajectory(jnp.asarray(grads), jnp.float32(threshold))
    applied = np.asarray(applied, np.float64)
    assert np.all(np.linalg.norm(applied, axis=1) <= threshold * (1 + 1e-5) + 1e-30)
    total = applied.sum(0) + np.asarray(residual, np.float64)
    expected = grads.astype(np.float64).sum(0)
    bound = 8 * np.finfo(np.float32).eps * np.abs(grads.astype(np.float64)).sum() + 1e-30
    np.testing.assert_allclose(total, expected, rtol=0, atol=bound)


# ------------------------------------------------------------------------------------------
# split_magnitude
# ------------------------------------------------------------------------------------------


def numpy_adagn(grads_seq, gamma1=0.7, gamma2=0.9, eps=1e-8, shared=True):
    """Stable-SPAM's AdaGN per tensor, in float64 numpy.

    ``shared=True`` is the reference: one step counter advanced on every call (no momentum
    resets here) and EMAs skipped on zero-norm tensors. ``shared=False`` gives each tensor a
    counter of its own EMA updates.
    """
    names = list(grads_seq[0])
    a = dict.fromkeys(names, 0.0)
    b = dict.fromkeys(names, 0.0)
    own = dict.fromkeys(names, 0)
    outputs = []
    for step, grads in enumerate(grads_seq, start=1):
        out = {}
        for name in names:
            g = np.asarray(grads[name], np.float64)
            norm = np.linalg.norm(g)
            if norm == 0:
                out[name] = g
                continue
            a[name] = gamma1 * a[name] + (1 - gamma1) * norm
            b[name] = gamma2 * b[name] + (1 - gamma2) * norm**2
            own[name] += 1
            k = step if shared else own[name]
            a_hat = a[name] / (1 - gamma1**k)
            b_hat = b[name] / (1 - gamma2**k)
            out[name] = g / norm * (a_hat / (np.sqrt(b_hat) + eps))
        outputs.append(out)
    return outputs


@pytest.mark.parametrize("gammas", [(0.7, 0.9), (0.85, 0.99999), (0.0, 0.5)])
def test_split_magnitude_matches_reference_without_zero_steps(gammas):
    grads = random_grads(6, 30, SHAPES, spikes=(7, 20))
    outputs, state = run_steps(gs.split_magnitude(*gammas), grads)
    expected = numpy_adagn(grads, *gammas)
    for ours, theirs in zip(outputs, expected, strict=True):
        assert_trees_close(ours, theirs, rtol=2e-5, atol=1e-7)
    assert int(state.ema_count["w"]) == 30


def test_split_magnitude_counters_differ_from_reference_only_after_zero_steps():
    grads = random_grads(7, 12, SHAPES)
    for t in (0, 1, 5):
        grads[t] = {"w": jnp.zeros((3, 4)), "b": grads[t]["b"]}
    ours, state = run_steps(gs.split_magnitude(), grads)
    shared, _ = run_steps(gs.split_magnitude(shared_count=True), grads)
    reference = numpy_adagn(grads, shared=True)
    per_tensor = numpy_adagn(grads, shared=False)
    for a, b, c, d in zip(ours, shared, reference, per_tensor, strict=True):
        assert_trees_close(b, c, rtol=2e-5, atol=1e-7)  # switch: the reference's numbers
        assert_trees_close(a, d, rtol=2e-5, atol=1e-7)  # default: per-tensor counters
    assert int(state.ema_count["w"]) == 9 and int(state.ema_count["b"]) == 12
    # At step 3 the reference bias-corrects w's single EMA update with k=3, not 1.
    assert not np.allclose(ours[2]["w"], reference[2]["w"], rtol=1e-3)
    np.testing.assert_allclose(jnp.linalg.norm(ours[2]["w"]), 1.0, rtol=1e-6)


def test_split_magnitude_first_step_normalises_each_tensor():
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0, 1e-3]), "z": jnp.zeros(3)}
    (updates,), state = run_steps(gs.split_magnitude(), [grads])
    np.testing.assert_allclose(updates["a"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], [0.0, 1e-3 / (1e-3 + 1e-8)], rtol=1e-6)
    np.testing.assert_array_equal(updates["z"], np.zeros(3))
    assert int(state.ema_count["z"]) == 0 and float(state.mu["z"]) == 0.0


def test_split_magnitude_nonfinite_tensor_passes_through_and_keeps_its_emas():
    tx = gs.split_magnitude()
    state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(2)})
    _, state = tx.update({"a": jnp.array([1.0, 0.0]), "b": jnp.array([2.0, 0.0])}, state)
    updates, new_state = tx.update({"a": jnp.array([jnp.nan, 1.0]), "b": jnp.ones(2)}, state)
    assert np.isnan(updates["a"][0]) and float(updates["a"][1]) == 1.0
    assert float(new_state.mu["a"]) == float(state.mu["a"])
    assert int(new_state.ema_count["a"]) == 1 and int(new_state.ema_count["b"]) == 2
    assert np.all(np.isfinite(np.asarray(updates["b"])))


@jax.jit
def adagn_two_steps(g, spike):
    tx = gs.split_magnitude()
    state = tx.init(g)
    first, state = tx.update(g, state)
    second, state = tx.update(g * spike, state)
    return first, second


@given(
    hnp.arrays(np.float32, (5,), elements=st.floats(-1e4, 1e4, width=32)),
    st.floats(0.015625, 100.0, width=32),
)
def test_split_magnitude_property_keeps_direction_and_damps_spikes(g, spike):
    outputs = adagn_two_steps(jnp.asarray(g), jnp.float32(spike))
    norm = np.linalg.norm(g.astype(np.float64))
    for u, x in zip(outputs, (g, g * np.float32(spike)), strict=True):
        u, x = np.asarray(u, np.float64), x.astype(np.float64)
        if norm == 0:
            np.testing.assert_array_equal(u, x)
            continue
        # u = c x with c > 0: the direction is kept.
        c = np.linalg.norm(u) / np.linalg.norm(x)
        np.testing.assert_allclose(u, c * x, rtol=1e-5, atol=1e-6 * np.linalg.norm(u))
    if norm > 1e-3:
        # A norm spike of any size comes out bounded: a_hat / sqrt(b_hat) <= 1/sqrt(1 - gamma2)
        # for two steps (a_hat <= max norm, b_hat >= (1 - gamma2) max norm^2 / (1 - gamma2^2)).
        np.testing.assert_allclose(np.linalg.norm(outputs[0]), 1.0, rtol=1e-4)
        assert np.linalg.norm(outputs[1]) <= 1.0 / np.sqrt(1 - 0.9**2) * (1 + 1e-5)


# ------------------------------------------------------------------------------------------
# split_by_path
# ------------------------------------------------------------------------------------------

MODEL = {
    "encoder": {"layer_0": {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.full(2, 4.0)}},
    "head": {"kernel": jnp.full(3, 2.0), "bias": jnp.ones(1)},
    "scale": jnp.array([5.0]),
}


def test_split_by_path_first_match_wins_and_default_is_identity():
    tx = gs.split_by_path(
        {"^encoder/.*bias$": gs.clip_by_value(0.5), "bias": gs.clip_by_value(0.25)}
    )
    updates, _ = tx.update(MODEL, tx.init(MODEL))
    np.testing.assert_array_equal(updates["encoder"]["layer_0"]["bias"], [0.5, 0.5])
    np.testing.assert_array_equal(updates["head"]["bias"], [0.25])
    assert_trees_equal(
        updates["encoder"]["layer_0"]["kernel"], MODEL["encoder"]["layer_0"]["kernel"]
    )
    assert_trees_equal(updates["scale"], MODEL["scale"])


def test_split_by_path_clips_each_group_by_its_own_norm_like_optax_partition():
    rules = [("kernel", gs.clip_by_global_norm(1.0))]
    tx = gs.split_by_path(rules, default=gs.clip_by_global_norm(2.0))
    ours, _ = tx.update(MODEL, tx.init(MODEL))
    labels = jax.tree_util.tree_map_with_path(
        lambda p, _: "k" if "kernel" in gs._paths.path_str(p) else "o", MODEL
    )
    ref = optax.partition(
        {"k": optax.clip_by_global_norm(1.0), "o": optax.clip_by_global_norm(2.0)}, labels
    )
    theirs, _ = ref.update(MODEL, ref.init(MODEL))
    assert_trees_close(ours, theirs, rtol=1e-6)
    kernels = [ours["encoder"]["layer_0"]["kernel"], ours["head"]["kernel"]]
    np.testing.assert_allclose(gs.global_norm(kernels), 1.0, rtol=1e-6)


def test_split_by_path_error_default_lists_unmatched_paths():
    tx = gs.split_by_path({"kernel": gs.clip_by_value(1.0)}, default="error")
    with pytest.raises(ValueError) as error:
        tx.init(MODEL)
    message = str(error.value)
    for path in ("encoder/layer_0/bias", "head/bias", "scale"):
        assert repr(path) in message
    assert "kernel" not in message
    covered = {"kernel": gs.clip_by_value(1.0), ".": optax.identity()}
    tx = gs.split_by_path(covered, default="error")
    tx.update(MODEL, tx.init(MODEL))


def test_split_by_path_states_visible_to_metrics_and_extra_args_reach_groups():
    tx = gs.split_by_path(
        {"kernel": gs.clip_by_global_norm(1.0), "bias": scale_by_value()},
        default=gs.clip_by_global_norm(10.0),
    )
    updates, state = jax.jit(tx.update)(MODEL, tx.init(MODEL), value=2.0)
    np.testing.assert_array_equal(updates["head"]["bias"], [2.0])
    stats = gs.metrics(state)
    thresholds = sorted(float(v) for k, v in stats.items() if k.endswith("/threshold"))
    assert thresholds == [1.0, 10.0]
    assert {"clip_by_global_norm/norm", "clip_by_global_norm_1/norm"} <= set(stats)


def test_split_by_path_paths_of_lists_and_dataclasses():
    tree = {"layers": [{"w": jnp.ones(2)}, {"w": jnp.ones(2)}]}
    tx = gs.split_by_path({"layers/1/w": gs.clip_by_value(0.5)})
    updates, _ = tx.update(tree, tx.init(tree))
    np.testing.assert_array_equal(updates["layers"][0]["w"], [1.0, 1.0])
    np.testing.assert_array_equal(updates["layers"][1]["w"], [0.5, 0.5])


# ------------------------------------------------------------------------------------------
# accumulate
# ------------------------------------------------------------------------------------------


def adam():
    return optax.adam(1e-2)


def clipped_momentum():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, 0.9))


def growing_k(step):
    return jnp.where(step < 2, 2, 3)


@pytest.mark.parametrize(
    "make_inner,every_k",
    [(adam, 1), (adam, 3), (adam, growing_k), (clipped_momentum, 3), (clipped_momentum, growing_k)],
)
def test_accumulate_matches_optax_multisteps(every_k, make_inner):
    grads = random_grads(8, 14, SHAPES, scale=2.0)
    params = jax.tree.map(jnp.ones_like, grads[0])
    ours_tx = gs.accumulate(make_inner(), every_k)
    theirs_tx = optax.MultiSteps(make_inner(), every_k)
    ours_state, theirs_state = ours_tx.init(params), theirs_tx.init(params)
    ours_update, theirs_update = jax.jit(ours_tx.update), jax.jit(theirs_tx.update)
    for g in grads:
        with standard_promotion():  # optax's adam needs implicit promotion
            ours, ours_state = ours_update(g, ours_state, params)
            theirs, theirs_state = theirs_update(g, theirs_state, params)
        assert_trees_close(ours, theirs, rtol=1e-5, atol=1e-7)
        assert int(ours_state.mini_step) == int(theirs_state.mini_step)
        assert int(ours_state.gradient_step) == int(theirs_state.gradient_step)
        assert_trees_close(ours_state.inner_state, theirs_state.inner_opt_state, 1e-5, 1e-7)
        assert_trees_close(ours_state.acc, theirs_state.acc_grads, rtol=1e-6, atol=1e-8)


def test_accumulate_runs_inner_only_on_the_kth_call():
    calls = []

    def counting():
        def init_fn(params):
            del params
            return optax.EmptyState()

        def update_fn(updates, state, params=None, **extra_args):
            jax.debug.callback(lambda: calls.append(1))
            return updates, state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    tx = gs.accumulate(counting(), 3)
    state = tx.init(jnp.zeros(2))
    update = jax.jit(tx.update)
    for _ in range(9):
        _, state = update(jnp.ones(2), state)
    jax.effects_barrier()
    assert len(calls) == 3


def test_accumulate_passes_extra_args_inside_chain():
    tx = optax.chain(gs.accumulate(scale_by_value(), 2))
    state = tx.init(jnp.zeros(1))
    u, state = tx.update(jnp.ones(1), state, value=5.0)
    np.testing.assert_array_equal(u, [0.0])
    u, state = tx.update(jnp.array([3.0]), state, value=0.5)
    np.testing.assert_array_equal(u, [1.0])  # mean 2, times the last call's value
    assert float(state[0].inner_state["value"]) == 0.5


def test_accumulate_clip_each_clips_micro_batches_before_averaging():
    grads = [jnp.array([10.0, 0.0]), jnp.array([0.0, 1.0])]
    each = gs.accumulate(optax.identity(), 2, clip_each=gs.clip_by_global_norm(1.0))
    after = gs.accumulate(gs.clip_by_global_norm(1.0), 2)
    outputs, state = run_steps(each, grads)
    np.testing.assert_allclose(outputs[1], [0.5, 0.5], rtol=1e-6)
    outputs, _ = run_steps(after, grads)
    np.testing.assert_allclose(outputs[1], np.array([5.0, 0.5]) / np.hypot(5.0, 0.5), rtol=1e-6)
    assert int(state.clip_state.count) == 2


def test_accumulate_recovers_after_a_nan_micro_batch():
    tx = gs.accumulate(optax.identity(), 2)
    grads = [jnp.array([jnp.nan]), jnp.array([1.0]), jnp.array([2.0]), jnp.array([4.0])]
    outputs, state = run_steps(tx, grads)
    assert np.isnan(outputs[1][0])
    np.testing.assert_array_equal(outputs[3], [3.0])
    assert np.all(np.isfinite(np.asarray(state.acc)))


def test_accumulate_states_visible_to_metrics():
    tx = gs.accumulate(optax.chain(gs.clip_by_global_norm(1.0), optax.sgd(0.1)), 2)
    _, state = run_steps(tx, [{"w": jnp.array([3.0, 4.0])}] * 2)
    stats = gs.metrics(state)
    assert float(stats["clip_by_global_norm/norm"]) == 5.0
    assert int(stats["accumulate/gradient_step"]) == 1 and int(stats["accumulate/mini_step"]) == 0


# ------------------------------------------------------------------------------------------
# bad arguments
# ------------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    ("clipper", lambda: gs.split_clip("clip")),
    ("residual_decay", lambda: gs.split_clip(residual_decay=1.5)),
    ("residual_decay", lambda: gs.split_clip(residual_decay=-0.1)),
    ("max_residual_norm", lambda: gs.split_clip(max_residual_norm=-1.0)),
    ("max_residual_norm", lambda: gs.split_clip(max_residual_norm=float("nan"))),
    ("gamma1", lambda: gs.split_magnitude(gamma1=1.0)),
    ("gamma1", lambda: gs.split_magnitude(gamma1=lambda step: 0.5)),
    ("gamma2", lambda: gs.split_magnitude(gamma2=-0.5)),
    ("eps", lambda: gs.split_magnitude(eps=-1e-8)),
    ("shared_count", lambda: gs.split_magnitude(shared_count=1)),
    ("axis_name", lambda: gs.split_magnitude(axis_name=3)),
    ("axis_name", lambda: gs.split_clip(axis_name=("d", ""))),
    ("rules", lambda: gs.split_by_path("kernel")),
    ("rules", lambda: gs.split_by_path({"[unclosed": optax.identity()})),
    ("rules", lambda: gs.split_by_path({"kernel": "adam"})),
    ("rules", lambda: gs.split_by_path([("kernel",)])),
    ("rules", lambda: gs.split_by_path({3: optax.identity()})),
    ("default", lambda: gs.split_by_path({}, default="raise")),
    ("default", lambda: gs.split_by_path({}, default=3)),
    ("inner", lambda: gs.accumulate(None, 2)),
    ("every_k", lambda: gs.accumulate(optax.identity(), 0)),
    ("every_k", lambda: gs.accumulate(optax.identity(), 2.5)),
    ("every_k", lambda: gs.accumulate(optax.identity(), True)),
    ("clip_each", lambda: gs.accumulate(optax.identity(), 2, clip_each=1.0)),
]


@pytest.mark.parametrize("name,make", BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_them(name, make):
    with pytest.raises(ValueError, match=name):
        make()


# ------------------------------------------------------------------------------------------
# edge matrix, shared by every transform of the module
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRANSFORMS)
def test_int_and_none_leaves_pass_through(name):
    tree = {"w": jnp.ones(3), "b": jnp.arange(2), "n": None, "m": jnp.array([True])}
    outputs, _ = run_steps(TRANSFORMS[name](), [tree, tree])
    for updates in outputs:
        assert updates["n"] is None
        np.testing.assert_array_equal(updates["b"], np.arange(2))
        assert updates["b"].dtype == jnp.int32 and updates["m"].dtype == jnp.bool_


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("name", TRANSFORMS)
def test_low_precision_keeps_dtype_and_handles_large_norms(name, dtype):
    tree = {"w": jnp.full((3, 4), 3e3, dtype), "b": jnp.full(4, 1e3, dtype)}
    outputs, state = run_steps(TRANSFORMS[name](), [tree, tree, tree])
    for updates in outputs:
        assert jax.tree.map(lambda x: x.dtype, updates) == {"w": dtype, "b": dtype}
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(updates))
    for value in gs.metrics(state).values():
        assert bool(jnp.all(jnp.isfinite(value)))


@pytest.mark.parametrize("name", TRANSFORMS)
def test_zero_gradients_give_zeros(name):
    tree = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    outputs, state = run_steps(TRANSFORMS[name](), [tree, tree])
    for updates in outputs:
        assert_trees_equal(updates, tree)
    for value in gs.metrics(state).values():
        assert bool(jnp.all(jnp.isfinite(value)))


@pytest.mark.parametrize("bad", [jnp.nan, -jnp.inf])
@pytest.mark.parametrize("name", TRANSFORMS)
def test_nonfinite_gradient_passes_through_and_does_not_poison_later_steps(name, bad):
    good = {"w": jnp.full((3, 4), 0.1), "b": jnp.full(4, 0.1)}
    broken = {"w": good["w"].at[0, 0].set(bad), "b": good["b"]}
    outputs, _ = run_steps(TRANSFORMS[name](), [good, good, broken, good, good, good, good])
    emitted = outputs[3] if name.startswith("accumulate") else outputs[2]
    assert not bool(jnp.all(jnp.isfinite(emitted["w"])))  # visible to a guard
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(outputs[-2:]))


@pytest.mark.parametrize("name", TRANSFORMS)
def test_state_structure_and_dtypes_are_stable(name):
    grads = random_grads(10, 2, SHAPES)
    tx = TRANSFORMS[name]()
    state = tx.init(grads[0])
    _, new_state = jax.jit(tx.update)(grads[0], state, grads[0])
    avals = lambda s: jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), s)
    assert avals(state) == avals(new_state)
    # ... so the update can sit in lax.cond and lax.scan.
    step = lambda s, g: (tx.update(g, s, g)[1], None)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grads)
    jax.jit(lambda s, g: jax.lax.scan(step, s, g))(state, stacked)
    jax.jit(lambda p, s: jax.lax.cond(p, lambda: tx.update(grads[0], s, grads[0])[1], lambda: s))(
        True, state
    )


@pytest.mark.parametrize("name", TRANSFORMS)
def test_checkpoint_round_trip_mid_run_continues_identically(name):
    grads = random_grads(11, 8, SHAPES, scale=3.0)
    tx = TRANSFORMS[name]()
    update = jax.jit(tx.update)
    state = tx.init(grads[0])
    for g in grads[:3]:
        _, state = update(g, state, g)
    blob = flax.serialization.to_bytes(state)
    restored = flax.serialization.from_bytes(tx.init(grads[0]), blob)
    for g in grads[3:]:
        a, state = update(g, state, g)
        b, restored = update(g, restored, g)
        assert_trees_equal(a, b)
    assert_trees_equal(state, restored)


def test_inject_hyperparams_with_numeric_hyperparameters():
    grads = random_grads(12, 4, SHAPES, scale=3.0)
    cases = [
        (gs.split_clip, {"residual_decay": 0.5, "max_residual_norm": 2.0}, ()),
        (gs.split_magnitude, {"gamma1": 0.8, "gamma2": 0.95}, ()),
        (gs.accumulate, {"inner": optax.sgd(0.1), "every_k": 2}, ("inner",)),
    ]
    for factory, kwargs, static in cases:
        plain, _ = run_steps(factory(**kwargs), grads)
        injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
        ours, _ = run_steps(injected, grads)
        for a, b in zip(plain, ours, strict=True):
            assert_trees_close(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------
# shard_map on 8 devices
# ------------------------------------------------------------------------------------------

from jax.sharding import PartitionSpec as P  # noqa: E402

SHARDED = {
    "split_clip": lambda axis=None: gs.split_clip(
        gs.clip_by_global_norm(1.0, axis_name=axis), max_residual_norm=3.0, axis_name=axis
    ),
    "split_magnitude": lambda axis=None: gs.split_magnitude(axis_name=axis),
}


@pytest.mark.parametrize("name", SHARDED)
def test_shard_map_gives_the_single_device_result(name):
    """Leaf ``a`` sharded over 8 devices, ``b`` replicated (counted once in the norms)."""
    grads = random_grads(13, 6, {"a": (16, 3), "b": (5,)}, scale=0.5, spikes=(2, 4))
    grads[3] = {"a": grads[3]["a"].at[1, 1].set(jnp.nan), "b": grads[3]["b"]}
    single, single_state = run_steps(SHARDED[name](), grads)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    tx = SHARDED[name]("d")
    state = tx.init(grads[0])
    grad_specs = {"a": P("d"), "b": P()}
    state_specs = jax.tree.map(lambda _: P(), state)
    if name == "split_clip":
        state_specs = state_specs._replace(residual=grad_specs)
    step = jax.jit(
        jax.shard_map(
            tx.update,
            mesh=mesh,
            in_specs=(grad_specs, state_specs),
            out_specs=(grad_specs, state_specs),
        )
    )

    def put(tree, specs):
        return jax.tree.map(lambda x, s: jax.device_put(x, jax.NamedSharding(mesh, s)), tree, specs)

    state = put(state, state_specs)
    for g, expected in zip(grads, single, strict=True):
        updates, state = step(put(g, grad_specs), state)
        assert_trees_close(updates, expected, rtol=2e-5, atol=1e-7)
    assert_trees_close(state, single_state, rtol=2e-5, atol=1e-7)
