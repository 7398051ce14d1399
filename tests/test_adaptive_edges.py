"""Numerical edge cases of the adaptive clippers: dtypes, pass-through leaves, empty trees,
zero, NaN and Inf gradients, gradients through the update, percentile properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from adaptive_cases import F32, FACTORIES, assert_trees_close, run_jitted, sequence
from hypothesis import given
from hypothesis import strategies as st

import gradsafe as gs

# --------------------------------------------------------------------------------------------
# Numerical edge cases
# --------------------------------------------------------------------------------------------


def mixed_tree(scale=1.0):
    return {
        "h": jnp.full((4,), 2.0 * scale, jnp.float16),
        "bf": jnp.full((3,), -1.5 * scale, jnp.bfloat16),
        "f": jnp.arange(5, dtype=jnp.float32) * scale,
        "i": jnp.arange(3, dtype=jnp.int32),
        "n": None,
    }


@pytest.mark.parametrize("name", FACTORIES)
def test_dtypes_kept_and_non_float_leaves_pass_through(name):
    tx = FACTORIES[name]()
    tree = mixed_tree()
    state = tx.init(tree)
    update = jax.jit(tx.update)
    for scale in (1.0, 1.0, 1.2, 0.9, 1.1, 1.0, 1.0, 300.0):
        out, state = update(mixed_tree(scale), state)
        assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(lambda x: x.dtype, tree)
        assert out["n"] is None
        np.testing.assert_array_equal(out["i"], tree["i"])
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
    assert bool(state.clipped)


@pytest.mark.parametrize("name", FACTORIES)
def test_float16_gradient_with_norm_1e4_is_clipped_without_overflow(name):
    tx = FACTORIES[name]()
    tree = {"w": jnp.full((4,), 5000.0, jnp.float16)}  # norm 1e4, its square overflows fp16
    state = tx.init(tree)
    calm = {"w": jnp.full((4,), 0.5, jnp.float16)}
    update = jax.jit(tx.update)
    for _ in range(6):
        _, state = update(calm, state)
    out, state = update(tree, state)
    assert float(state.norm) == pytest.approx(1e4, rel=1e-3)
    assert bool(state.clipped) and bool(jnp.all(jnp.isfinite(out["w"])))
    assert float(jnp.max(jnp.abs(out["w"]))) < 5000.0


@pytest.mark.parametrize("name", FACTORIES)
def test_zero_gradients_stay_zero(name):
    tx = FACTORIES[name]()
    zeros = {"a": jnp.zeros((3, 2)), "b": jnp.zeros(4)}
    state = tx.init(zeros)
    update = jax.jit(tx.update)
    for _ in range(12):
        out, state = update(zeros, state)
        assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(out))
    stats = state._replace(threshold=jnp.zeros([]))  # threshold is inf when nothing binds
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(stats) if x.dtype != bool)
    assert not bool(state.clipped)


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_gradient_passes_through_and_statistics_are_kept(name, bad):
    tx = FACTORIES[name]()
    grads = sequence(10)
    _, states = run_jitted(tx, grads)
    before = states[-1]
    poisoned = {"a": grads[0]["a"].at[0, 0].set(bad), "b": grads[0]["b"]}
    out, after = jax.jit(tx.update)(poisoned, before)
    if name == "adagc_leaf":  # per leaf: only the bad leaf passes through
        np.testing.assert_array_equal(out["a"], poisoned["a"])
    elif name != "spike_clip":  # element-wise: only the bad entry passes through
        assert_trees_close(out, poisoned, rtol=0, atol=0)
    assert not math.isfinite(float(after.norm))
    kept = {
        "zclip": ("mean", "var", "samples"),
        "zclip_uncapped": ("mean", "var", "samples"),
        "zclip_percentile": ("mean", "var", "samples"),
        "autoclip_p2": ("history", "positions", "samples"),
        "autoclip_window": ("history", "samples"),
        "adagc_leaf": (),
        "adagc_global": ("gamma",),
        "spike_clip": (),
    }[name]
    for field in kept:
        np.testing.assert_array_equal(getattr(after, field), getattr(before, field))
    if name == "adagc_leaf":  # the bad leaf's gamma is kept, the other one moves on
        assert after.gamma[0] == before.gamma[0]
    if name == "spike_clip":
        assert float(after.nu["a"][0, 0]) == float(before.nu["a"][0, 0])
        assert out["a"][0, 0] == poisoned["a"][0, 0] or math.isnan(bad)
    # and the next finite step is handled normally
    out, _ = jax.jit(tx.update)(grads[1], after)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))


_SCANS = {}


def _threshold_scan(window):
    """A compiled scan of autoclip over 1-element gradients, the percentile traced."""
    if window not in _SCANS:

        def run(percentile, norms):
            tx = gs.autoclip(percentile, window=window)

            def body(state, x):
                out, state = tx.update(x[None], state)
                return state, (out[0], state.threshold)

            state, (outs, thresholds) = jax.lax.scan(body, tx.init(jnp.zeros(1)), norms)
            return outs, thresholds, state.history

        _SCANS[window] = jax.jit(run)
    return _SCANS[window]


@given(st.floats(0.0, 100.0), st.sampled_from([1, 2, 7, 16, 40]), st.integers(0, 2**31 - 1))
def test_autoclip_window_is_numpy_percentile_of_the_last_w_norms(percentile, window, seed):
    norms = np.random.default_rng(seed).lognormal(0.0, 1.0, 25).astype(F32)
    outs, thresholds, _ = _threshold_scan(window)(jnp.float32(percentile), norms)
    for t in range(len(norms)):
        exact = np.percentile(norms[max(0, t + 1 - window) : t + 1].astype(np.float64), percentile)
        np.testing.assert_allclose(float(thresholds[t]), exact, rtol=3e-6)
    assert np.all(np.asarray(outs) <= norms)


@given(st.floats(0.0, 100.0), st.integers(0, 2**31 - 1))
def test_p2_is_exact_for_five_norms_and_tracks_min_max(percentile, seed):
    norms = np.random.default_rng(seed).lognormal(0.0, 1.0, 12).astype(F32)
    _, thresholds, markers = _threshold_scan(None)(jnp.float32(percentile), norms)
    for t in range(len(norms)):
        seen = norms[: t + 1].astype(np.float64)
        if t < 5 or percentile in (0.0, 100.0):
            exact = np.percentile(seen, percentile)
            np.testing.assert_allclose(float(thresholds[t]), exact, rtol=3e-6)
        assert seen.min() <= float(thresholds[t]) <= seen.max()
    assert float(markers[0]) == norms.min() and float(markers[4]) == norms.max()
