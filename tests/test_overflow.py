"""Fail closed on overflow and in half precision (issue 12, defects 1 and 2).

A finite gradient whose float32 sum of squares overflows must still be clipped; only a
gradient that holds NaN/Inf itself passes through. Scale factors are applied in float32, so
float16 leaves are clipped correctly whatever the factor's size.
"""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gradsafe as gs
from gradsafe import _numerics as nx

HUGE = jnp.array([1e20, 1.0], jnp.float32)  # sum of squares overflows float32
NEAR_MAX = jnp.array([3e38, 1.0], jnp.float32)  # one entry near the largest float32


def l2(x):
    return math.sqrt(float(np.sum(np.square(np.asarray(x, np.float64)))))


def rms(x):
    return l2(x) / math.sqrt(np.asarray(x).size)


def step(tx, grads, state=None, params=None):
    state = tx.init(grads if params is None else params) if state is None else state
    return jax.jit(tx.update)(grads, state, grads if params is None else params)


# --------------------------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "p", "expected"),
    [
        ([1e20, 1.0], 2, 1e20),
        ([3e19, 4e19], 2, 5e19),
        ([3e38, 1.0], 2, 3e38),
        ([2e38, 2e38], 1, float(np.finfo(np.float32).max)),  # saturates: true value 4e38
        ([3e38, 3e38], 2, float(np.finfo(np.float32).max)),
        ([1e20, -1e20], "inf", 1e20),
    ],
)
def test_global_norm_of_finite_input_is_finite(x, p, expected):
    got = float(jax.jit(lambda t: gs.global_norm(t, p))(jnp.array(x, jnp.float32)))
    assert math.isfinite(got)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_global_norm_of_non_finite_input_is_not_finite():
    assert math.isinf(float(gs.global_norm(jnp.array([jnp.inf, 1e20]))))
    assert math.isnan(float(gs.global_norm(jnp.array([jnp.nan, 1e20]))))
    assert math.isnan(float(gs.global_norm({"a": jnp.array([jnp.nan]), "b": HUGE})))


def test_leaf_norms_over_axes_rescale_only_what_overflowed():
    x = jnp.array([[1e20, 1.0], [3.0, 4.0]], jnp.float32)
    rows = nx.leaf_norm(x, axis=1)
    np.testing.assert_allclose(rows, [1e20, 5.0], rtol=1e-6)
    cols = nx.leaf_norm(x, axis=0, keepdims=True)
    assert cols.shape == (1, 2)
    np.testing.assert_allclose(cols, [[1e20, math.sqrt(17.0)]], rtol=1e-6)


def test_norm_gradient_at_zero_stays_finite():
    assert np.all(np.isfinite(jax.grad(gs.global_norm)(jnp.zeros(3))))


@given(
    hnp.arrays(
        np.float32,
        st.integers(1, 6),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    )
)
def test_global_norm_matches_float64_for_every_finite_input(x):
    expected = min(l2(x), float(np.finfo(np.float32).max))
    got = float(gs.global_norm(jnp.asarray(x)))
    assert math.isfinite(got)
    if got == 0:  # every square underflowed to 0 (entries below ~1e-23): documented
        assert expected < 1e-22
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Every norm-based clipper clips a finite gradient whose squares overflow
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grads", [HUGE, NEAR_MAX, HUGE.astype(jnp.bfloat16)], ids=str)
@pytest.mark.parametrize("semantics", ["optax", "torch"])
def test_clip_by_global_norm_clips_overflowing_gradient(grads, semantics):
    out, state = step(gs.clip_by_global_norm(1.0, semantics=semantics), grads)
    assert out.dtype == grads.dtype
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert l2(out) <= 1.0 + 1e-5
    assert bool(state.clipped) and math.isfinite(float(state.norm))
    if grads is HUGE:  # the direction is kept: [1, 1e-20]
        np.testing.assert_allclose(np.asarray(out), [1.0, 1e-20], rtol=1e-5)


def test_skip_nonfinite_chain_applies_the_clipped_step():
    # By default (check="gradient") the guard decides from the raw gradient and refuses one
    # whose squared norm overflows float32 (fail-closed: an optimizer's g * g would overflow),
    # even though the chain would clip it; check="full" judges the chain's output instead.
    inner = optax.chain(gs.clip_by_global_norm(1.0), optax.sgd(0.1))
    params = jnp.zeros(2, jnp.float32)

    out, state = step(gs.skip_nonfinite(inner), HUGE, params=params)
    np.testing.assert_array_equal(optax.apply_updates(params, out), params)
    assert bool(state.skipped) and gs.SKIP_REASONS[int(state.reason)] == "gradient_overflow"
    assert np.all(np.isfinite(np.asarray(out)))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))

    out, state = step(gs.skip_nonfinite(inner, check="full"), HUGE, params=params)
    assert not bool(state.skipped) and gs.SKIP_REASONS[int(state.reason)] == "accepted"
    new_params = optax.apply_updates(params, out)
    np.testing.assert_allclose(np.asarray(new_params), [-0.1, -1e-21], rtol=1e-5)


def test_clip_by_leaf_norm_clips_overflowing_leaf():
    grads = {"a": HUGE, "b": jnp.array([0.5])}
    out, state = step(gs.clip_by_leaf_norm(1.0), grads)
    assert l2(out["a"]) <= 1.0 + 1e-6
    np.testing.assert_array_equal(out["b"], [0.5])
    np.testing.assert_allclose(float(state.norm), 1e20, rtol=1e-6)


def test_clip_by_block_rms_clips_overflowing_leaf():
    out, state = step(gs.clip_by_block_rms(1.0), HUGE)
    assert rms(out) <= 1.0 + 1e-6 and bool(state.clipped)


def test_adaptive_grad_clip_clips_overflowing_unit():
    params = jnp.ones(2)
    out, _ = step(gs.adaptive_grad_clip(0.1), HUGE, params=params)
    assert l2(out) <= 0.1 * math.sqrt(2) * (1 + 1e-6)


def test_adaptive_grad_clip_bound_from_a_float64_weight_beyond_float32():
    """The bound r * ||w|| of a float64 weight of norm 5e306 is finite: it must not become an
    infinite threshold (a cast to float32) that lets a gradient of norm 1.7e308 through."""
    with jax.enable_x64(True):
        grads = jnp.array([-1.42e308, 9.05e307], jnp.float64)
        params = jnp.array([-3.3e30, -5.39e306], jnp.float64)
        out, _ = step(gs.adaptive_grad_clip(0.01), grads, params=params)
        norm = float(np.linalg.norm(np.asarray(out) / 1e300)) * 1e300
    assert norm <= 0.01 * 5.39e306 * (1 + 1e-6)


@pytest.mark.parametrize("threshold", [0.0, 1e-30])
def test_a_norm_that_underflows_is_clipped_to_a_tiny_threshold(threshold):
    """Entries of 1e-22: their float32 squares underflow and the cheap norm is 0. A threshold
    below that is still obeyed (the gradient is zeroed), never skipped."""
    grads = jnp.full((3,), 9.43e-23, jnp.float32)
    out, _ = step(gs.clip_by_global_norm(threshold), grads)
    assert l2(out) <= threshold
    out, _ = step(gs.split_clip(gs.clip_by_global_norm(threshold)), grads)
    assert l2(out) <= threshold


def test_clip_update_relative_zero_update_at_zero_parameter_keeps_the_tensor():
    """An entry of zero update and zero bound (absolute=0 at a zero parameter) is met exactly:
    it must not zero the other entries of its tensor."""
    params = jnp.array([0.0, 10.0])
    out, _ = step(gs.clip_update_relative(0.1, 0.0), jnp.array([0.0, 0.5]), params=params)
    np.testing.assert_array_equal(out, [0.0, 0.5])


def test_zclip_caps_an_overflowing_gradient_in_warmup_and_flags_a_spike_after():
    tx = gs.zclip(warmup_steps=2, max_norm=None)
    _, state = step(tx, jnp.array([0.6, 0.8]))
    _, state = step(tx, jnp.array([0.0, 1.1]), state)
    out, state = step(tx, HUGE, state)
    assert bool(state.spike) and not bool(state.capped)
    assert l2(out) <= float(state.threshold) * (1 + 1e-6)
    assert math.isfinite(float(state.mean)) and math.isfinite(float(state.var))
    capped_out, capped = step(gs.zclip(), HUGE)  # warm-up: the cap of 1.0 applies
    assert l2(capped_out) <= 1.0 and bool(capped.capped) and not bool(capped.spike)


def test_zclip_statistics_stay_finite_after_a_huge_warmup_norm():
    tx = gs.zclip(warmup_steps=2, max_norm=None)
    _, state = step(tx, HUGE)
    _, state = step(tx, jnp.array([1.0, 0.0]), state)
    assert math.isfinite(float(state.mean)) and math.isfinite(float(state.var))


def test_autoclip_clips_overflowing_gradient():
    tx = gs.autoclip(50.0, window=8)
    state = None
    for g in ([1.0, 0.0], [0.0, 2.0], [1.5, 0.0]):
        _, state = step(tx, jnp.array(g), state)
    out, state = step(tx, HUGE, state)
    assert math.isfinite(float(state.threshold))
    assert l2(out) <= float(state.threshold) * (1 + 1e-6) and bool(state.clipped)


@pytest.mark.parametrize("scope", ["leaf", "global"])
def test_adagc_clips_overflowing_gradient(scope):
    tx = gs.adagc(warmup_steps=1, scope=scope)
    _, state = step(tx, jnp.array([0.3, 0.4]))
    out, state = step(tx, HUGE, state)
    assert l2(out) <= 1.04 * 0.5 * (1 + 1e-5)
    assert np.all(np.isfinite(np.asarray(state.gamma)))


def test_split_magnitude_rescales_overflowing_gradient_and_keeps_finite_emas():
    tx = gs.split_magnitude()
    out, state = step(tx, HUGE)
    # First step: norm -> ~1 (the EMA of n^2 saturates at the largest float32 for n = 1e20,
    # so the norm comes out a little above 1).
    assert 0.5 <= l2(out) <= 2.0
    out, state = step(tx, jnp.array([3.0, 4.0]), state)
    assert np.all(np.isfinite(np.asarray(out)))
    assert all(np.isfinite(float(x)) for x in jax.tree.leaves((state.mu, state.nu)))


def test_cooldown_on_spike_detects_an_overflowing_gradient():
    tx = gs.cooldown_on_spike(warmup_steps=2, factor=0.1)
    state = None
    for g in ([1.0, 0.0], [0.0, 1.2]):
        _, state = step(tx, jnp.array(g), state)
    out, state = step(tx, HUGE, state)
    assert bool(state.spike)
    np.testing.assert_allclose(np.asarray(out), np.asarray(HUGE) * 0.1, rtol=1e-6)


def test_spike_clip_clips_an_overflowing_entry():
    tx = gs.spike_clip(threshold=4.0, beta2=0.5, warmup_steps=2)
    _, state = step(tx, jnp.array([1.0, 1.0]))
    out, state = step(tx, HUGE, state)
    # v = 0.5 after the first step: the bound is sqrt(4 * 0.5)
    np.testing.assert_allclose(np.asarray(out), [math.sqrt(2.0), 1.0], rtol=1e-6)
    assert math.isfinite(float(state.norm))
    assert np.all(np.isfinite(np.asarray(state.nu)))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_a_gradient_holding_nan_or_inf_still_passes_through(bad):
    grads = jnp.array([bad, 1e20], jnp.float32)
    for tx in (gs.clip_by_global_norm(1.0), gs.clip_by_leaf_norm(1.0), gs.clip_by_block_rms(1.0)):
        out, state = step(tx, grads)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(grads))
        assert not bool(state.clipped)


# --------------------------------------------------------------------------------------------
# float16 / bfloat16: the factor is applied in float32
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [1.9e7, 6e7])
def test_clip_by_global_norm_float16_large_norm(norm):
    size = round((norm / 60000.0) ** 2)
    grads = jnp.full((size,), 60000.0, jnp.float16)
    out, state = step(gs.clip_by_global_norm(1.0), grads)
    assert out.dtype == jnp.float16
    np.testing.assert_allclose(float(state.norm), norm, rtol=1e-3)
    np.testing.assert_allclose(l2(out), 1.0, rtol=2e-3)


def test_clip_by_block_rms_float16_small_threshold():
    grads = jnp.full((8,), 100.0, jnp.float16)
    out, _ = step(gs.clip_by_block_rms(1e-3), grads)
    assert out.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out, np.float32), 1e-3, rtol=1e-3)


def test_split_magnitude_float16_tiny_norm():
    grads = jnp.array([2e-6, 0.0], jnp.float16)
    out, _ = step(gs.split_magnitude(), grads)
    assert out.dtype == jnp.float16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    # target a / (sqrt(b) + eps) = 2e-6 / (2e-6 + 1e-8)
    np.testing.assert_allclose(l2(out), 2e-6 / (2e-6 + 1e-8), rtol=1e-3)


def test_scale_leaf_multiplies_half_precision_in_float32():
    x = jnp.array([60000.0, 1.0], jnp.float16)
    out = nx.scale_leaf(x, jnp.asarray(1e-8, jnp.float32))
    assert out.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out, np.float32), [6e-4, 0.0], rtol=1e-2, atol=1e-7)
    big = nx.scale_leaf(jnp.array([1e-4], jnp.float16), jnp.asarray(1e5, jnp.float32))
    np.testing.assert_allclose(np.asarray(big, np.float32), [10.0], rtol=1e-2)


@given(
    st.sampled_from([jnp.float16, jnp.bfloat16, jnp.float32]),
    st.floats(-30, 30),
    st.integers(1, 16),
    st.floats(-3, 3),
)
def test_clip_by_global_norm_obeys_its_bound_for_every_finite_input(dtype, exponent, size, t):
    """Whenever every entry is finite (after the cast), the output is finite and within
    max_norm (up to the rounding of the output dtype)."""
    finfo = jnp.finfo(dtype)
    value = min(10.0**exponent, float(finfo.max))
    grads = jnp.full((size,), value, jnp.float32).astype(dtype)
    threshold = 10.0**t
    out, _ = step(gs.clip_by_global_norm(threshold), grads)
    out32 = np.asarray(out, np.float32)
    assert np.all(np.isfinite(out32))
    assert l2(out32) <= threshold * (1 + 4 * float(finfo.eps)) + float(finfo.smallest_subnormal)
