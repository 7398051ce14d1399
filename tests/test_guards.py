"""Guards: refusals, counters, spike statistics, loss-scale sequences (jmp, GradScaler,
Megatron), jit, checkpoints, shard_map and argument checks."""

import functools
import logging

import flax.serialization
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import gradsafe as gs

REASON = {name: code for code, name in enumerate(gs.SKIP_REASONS)}

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def bits(tree):
    """Every leaf as raw bytes (bit-identity, NaN included)."""
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def assert_bit_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert bits(a) == bits(b)


def adam(learning_rate, **kwargs):
    """``optax.adam``, whose bias correction mixes float and int32 (strict promotion refuses)."""
    tx = optax.adam(learning_rate, **kwargs)

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(tx.init, update)


def adamw(learning_rate, **kwargs):
    tx = optax.adamw(learning_rate, **kwargs)

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(tx.init, update)


def adam_params():
    return {"w": jnp.array([[0.5, -1.0], [2.0, 0.25]]), "b": jnp.array([0.1, -0.2])}


def grads_like(params, value=1.0):
    return jax.tree.map(lambda x: jnp.full_like(x, value), params)


# ------------------------------------------------------------------------------------------
# skip_nonfinite
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_nonfinite_gradient_is_refused_and_state_kept(bad):
    params = adam_params()
    tx = gs.skip_nonfinite(adam(0.1))
    state = tx.init(params)
    _, state = tx.update(grads_like(params, 0.3), state, params)
    grads = grads_like(params, 0.3)
    grads["w"] = grads["w"].at[1, 0].set(bad)
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    jax.tree.map(lambda u: np.testing.assert_array_equal(u, np.zeros_like(u)), updates)
    assert_bit_identical(new_state.inner_state, state.inner_state)
    assert bool(new_state.skipped)
    assert int(new_state.reason) == REASON["nonfinite_gradient"]
    assert (int(new_state.consecutive_skips), int(new_state.total_skips)) == (1, 1)


def test_nonfinite_loss_is_refused():
    tx = gs.skip_nonfinite(optax.sgd(1.0))
    state = tx.init(jnp.zeros(2))
    updates, state = tx.update(jnp.ones(2), state, value=jnp.array(jnp.nan))
    np.testing.assert_array_equal(updates, [0.0, 0.0])
    assert gs.SKIP_REASONS[int(state.reason)] == "nonfinite_loss"
    updates, state = tx.update(jnp.ones(2), state, value=jnp.array(2.0))
    np.testing.assert_array_equal(updates, [-1.0, -1.0])
    assert not bool(state.skipped) and int(state.reason) == 0


def test_nonfinite_inner_output_is_refused_by_the_full_check():
    # A finite gradient that the inner transform turns into Inf: only check="full" sees it.
    tx = gs.skip_nonfinite(optax.chain(optax.scale(1e38), optax.scale(1e3)), check="full")
    state = tx.init(jnp.zeros(2))
    updates, new_state = tx.update(jnp.ones(2), state)
    np.testing.assert_array_equal(updates, [0.0, 0.0])
    assert gs.SKIP_REASONS[int(new_state.reason)] == "nonfinite_update"
    assert_bit_identical(new_state.inner_state, state.inner_state)


@pytest.mark.parametrize("check, reason", [("full", "nonfinite_state"),
                                           ("gradient", "gradient_overflow")])  # fmt: skip
def test_state_overflow_on_huge_finite_gradient_is_refused(check, reason):
    # Adam's second moment g^2 overflows float32 for |g| > 1.8e19: the output is finite
    # (m / sqrt(inf) = 0) but the state would be poisoned for every later step. The full check
    # sees the new state; the gradient check sees the squared norm overflow first.
    params = adam_params()
    tx = gs.skip_nonfinite(adam(0.1), check=check)
    state = tx.init(params)
    updates, new_state = tx.update(grads_like(params, 1e25), state, params)
    assert gs.SKIP_REASONS[int(new_state.reason)] == reason
    assert_bit_identical(new_state.inner_state, state.inner_state)
    jax.tree.map(lambda u: np.testing.assert_array_equal(u, np.zeros_like(u)), updates)
    # The bare optimizer really does poison its state on this gradient.
    _, bare = adam(0.1).update(grads_like(params, 1e25), adam(0.1).init(params))
    assert not np.isfinite(np.asarray(bare[0].nu["w"])).all()


def test_nonfinite_sentinels_already_in_the_state_are_not_refusals():
    def init_fn(params):
        return {"lowest": jnp.full([], jnp.inf), "count": jnp.zeros([], jnp.int32)}

    def update_fn(updates, state, params=None):
        return updates, {"lowest": state["lowest"], "count": state["count"] + 1}

    tx = gs.skip_nonfinite(optax.GradientTransformation(init_fn, update_fn))
    state = tx.init(jnp.zeros(2))
    updates, state = tx.update(jnp.ones(2), state)
    assert not bool(state.skipped) and int(state.inner_state["count"]) == 1
    np.testing.assert_array_equal(updates, [1.0, 1.0])


def counting(inner):
    """``inner`` with a counter of how many times its ``update`` is called (traced)."""
    calls = []

    def update(updates, state, params=None, **extra_args):
        calls.append(1)
        return inner.update(updates, state, params)

    return optax.GradientTransformationExtraArgs(inner.init, update), calls


@pytest.mark.parametrize(
    "wrap",
    [
        lambda inner: gs.skip_nonfinite(inner),
        lambda inner: gs.stabilize(inner),
        lambda inner: gs.accumulate(inner, 2),
    ],
    ids=["skip_nonfinite", "stabilize", "accumulate"],
)
def test_the_inner_update_is_traced_once_under_jit(wrap):
    # The refusing branch needs the inner update's output shapes; tracing it a second time
    # for them doubled the tracing time on large trees.
    inner, calls = counting(optax.sgd(0.1, momentum=0.9))
    tx = wrap(inner)
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    state = tx.init(params)
    jax.jit(lambda g, s: tx.update(g, s, params)).lower(params, state)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "wrap",
    [lambda inner: gs.skip_nonfinite(inner), lambda inner: gs.accumulate(inner, 1)],
    ids=["skip_nonfinite", "accumulate"],
)
def test_an_eager_accepted_step_calls_the_inner_update_once(wrap):
    # the refusing branch's shapes are computed only when that branch is taken
    inner, calls = counting(optax.sgd(0.1, momentum=0.9))
    tx = wrap(inner)
    params = {"a": jnp.ones(3)}
    tx.update(params, tx.init(params), params)
    assert len(calls) == 1


def test_eager_vmap_compiles_nothing_on_later_calls(caplog):
    # under vmap without jit, a fresh jax.jit of the inner update would compile on every call
    tx = gs.skip_nonfinite(optax.sgd(0.1, momentum=0.9))
    params = {"a": jnp.ones(3)}
    state = tx.init(params)
    batched = jax.vmap(lambda g: tx.update(g, state, params)[0])
    grads = {"a": jnp.ones((4, 3))}
    batched(grads)
    with jax.log_compiles(True), caplog.at_level(logging.DEBUG, logger="jax"):
        batched(grads)
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()]


def test_counters_consecutive_and_total():
    tx = gs.skip_nonfinite(optax.sgd(1.0))
    state = tx.init(jnp.zeros(1))
    update = jax.jit(tx.update)
    pattern = [1, 0, 0, 1, 1, 1, 0, 1]  # 1 = NaN step
    consecutive = total = 0
    for bad in pattern:
        _, state = update(jnp.array([jnp.nan if bad else 1.0]), state)
        consecutive = consecutive + 1 if bad else 0
        total += bad
        assert (int(state.consecutive_skips), int(state.total_skips)) == (consecutive, total)
        assert bool(state.skipped) == bool(bad)


def test_counters_saturate_at_int32_max():
    tx = gs.skip_nonfinite(optax.sgd(1.0))
    state = tx.init(jnp.zeros(1))
    top = jnp.iinfo(jnp.int32).max
    state = state._replace(consecutive_skips=jnp.int32(top), total_skips=jnp.int32(top))
    _, state = tx.update(jnp.array([jnp.nan]), state)
    assert int(state.consecutive_skips) == top and int(state.total_skips) == top


def test_never_gives_up_unlike_apply_if_finite():
    ours = gs.skip_nonfinite(optax.sgd(1.0))
    theirs = optax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=3)
    p_ours = p_theirs = jnp.zeros(1)
    s_ours, s_theirs = ours.init(p_ours), theirs.init(p_theirs)
    for _ in range(6):
        u, s_ours = ours.update(jnp.array([jnp.nan]), s_ours)
        p_ours = optax.apply_updates(p_ours, u)
        u, s_theirs = theirs.update(jnp.array([jnp.nan]), s_theirs)
        p_theirs = optax.apply_updates(p_theirs, u)
    assert np.isfinite(p_ours).all() and not np.isfinite(p_theirs).all()
    assert int(s_ours.total_skips) == 6


def test_clean_steps_equal_inner_exactly():
    params = adam_params()
    inner = adamw(0.05, weight_decay=0.1)
    tx = gs.skip_nonfinite(inner)
    s_ours, s_inner = tx.init(params), inner.init(params)
    update_ours, update_inner = jax.jit(tx.update), jax.jit(inner.update)
    for i in range(5):
        grads = jax.tree.map(lambda x, k=i + 1: jnp.sin(x * k), params)
        u_ours, s_ours = update_ours(grads, s_ours, params)
        u_inner, s_inner = update_inner(grads, s_inner, params)
        assert_bit_identical(u_ours, u_inner)
        assert_bit_identical(s_ours.inner_state, s_inner)


def test_passthrough_leaves_and_dtypes():
    params = {
        "h": jnp.ones(3, jnp.float16),
        "b": jnp.ones(2, jnp.bfloat16),
        "i": jnp.arange(3),
        "n": None,
    }
    tx = gs.skip_nonfinite(optax.identity())
    state = tx.init(params)
    grads = {"h": jnp.ones(3, jnp.float16), "b": jnp.ones(2, jnp.bfloat16), "i": jnp.arange(3)}
    grads["n"] = None
    updates, state = tx.update(grads, state)
    assert updates["h"].dtype == jnp.float16 and updates["b"].dtype == jnp.bfloat16
    assert updates["n"] is None and not bool(state.skipped)
    grads["h"] = grads["h"].at[0].set(jnp.inf)
    updates, state = tx.update(grads, state)
    assert bool(state.skipped)
    assert updates["h"].dtype == jnp.float16 and updates["i"].dtype == grads["i"].dtype
    np.testing.assert_array_equal(updates["i"], [0, 0, 0])


def test_metrics_report_the_guard():
    tx = gs.skip_nonfinite(optax.chain(gs.clip_by_global_norm(1.0), optax.sgd(1.0)))
    state = tx.init(jnp.zeros(2))
    _, state = tx.update(jnp.array([jnp.nan, 1.0]), state)
    m = gs.metrics(state)
    assert bool(m["skip_nonfinite/skipped"]) and int(m["skip_nonfinite/total_skips"]) == 1
    assert int(m["skip_nonfinite/reason"]) == REASON["nonfinite_gradient"]
    assert "clip_by_global_norm/norm" in m  # found inside inner_state


def test_extra_args_reach_a_plain_inner_transform():
    tx = gs.skip_nonfinite(optax.sgd(1.0))
    updates, _ = tx.update(jnp.ones(1), tx.init(jnp.zeros(1)), unknown=3, value=jnp.array(1.0))
    np.testing.assert_array_equal(updates, [-1.0])


# ------------------------------------------------------------------------------------------
# skip_on_spike
# ------------------------------------------------------------------------------------------


def spike_reference(
    losses, norms, *, sigma, window, min_history, watch, record_refused, max_consecutive
):
    """Plain-Python model of skip_on_spike's decisions (reasons) for finite gradients."""
    loss_hist, norm_hist, reasons = [], [], []
    spike_refusals = 0  # in a row; a refusal of a non-finite loss neither counts nor resets
    bound = np.inf if max_consecutive is None else max_consecutive

    def spikes(x, hist):
        if len(hist) < min_history:
            return False
        values = np.array(hist[-window:], np.float64)
        return x - values.mean() > sigma * values.std(ddof=1)

    for loss, norm in zip(losses, norms, strict=True):
        loss_spike = "loss" in watch and np.isfinite(loss) and spikes(loss, loss_hist)
        norm_spike = "norm" in watch and (not np.isfinite(norm) or spikes(norm, norm_hist))
        # after max_consecutive spike refusals in a row, a spike is a new level: accepted, and
        # the windows restart from it
        new_level = spike_refusals >= bound and (loss_spike or norm_spike)
        if not np.isfinite(loss):
            reason = "nonfinite_loss"
        elif loss_spike and not new_level:
            reason = "loss_spike"
        elif norm_spike and not new_level:
            reason = "norm_spike"
        else:
            reason = "accepted"
        reasons.append(reason)
        if reason == "accepted":
            spike_refusals = 0
        elif reason.endswith("_spike"):
            spike_refusals += 1
        if new_level and reason == "accepted":
            loss_hist, norm_hist = [], []
        if reason == "accepted" or record_refused:
            if np.isfinite(loss):
                loss_hist.append(loss)
            if np.isfinite(norm):
                norm_hist.append(norm)
    return reasons


@functools.cache
def spike_update(sigma, window, min_history, watch, record_refused, max_consecutive):
    tx = gs.skip_on_spike(
        optax.sgd(1.0),
        sigma=sigma,
        window=window,
        min_history=min_history,
        watch=watch,
        record_refused=record_refused,
        max_consecutive_skips=max_consecutive,
    )
    return tx, jax.jit(tx.update)


@given(
    st.lists(
        st.tuples(
            st.sampled_from([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 30.0, np.nan, 0.0]),
            st.sampled_from([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 4.0, 40.0, 0.01]),
            st.floats(-0.2, 0.2),
        ),
        min_size=1,
        max_size=40,
    ),
    st.sampled_from([("loss", "norm"), ("loss",), ("norm",)]),
    st.booleans(),
    st.sampled_from([1, 3, None]),
)
def test_spike_decisions_match_reference(steps, watch, record_refused, max_consecutive):
    sigma, window, min_history = 3.0, 8, 4
    tx, update = spike_update(sigma, window, min_history, watch, record_refused, max_consecutive)
    state = tx.init(jnp.zeros(2))
    losses, norms, reasons = [], [], []
    for loss_mult, norm_mult, noise in steps:
        loss = np.float32(loss_mult * (1.0 + noise))
        grads = jnp.array([3.0, 4.0], jnp.float32) * np.float32(norm_mult * (1 + noise))
        updates, new_state = update(grads, state, value=jnp.array(loss))
        if bool(new_state.skipped):
            assert_bit_identical(new_state.inner_state, state.inner_state)
            np.testing.assert_array_equal(updates, [0.0, 0.0])
        state = new_state
        losses.append(float(loss))
        norms.append(float(state.norm))
        reasons.append(gs.SKIP_REASONS[int(state.reason)])
    expected = spike_reference(
        losses,
        norms,
        sigma=sigma,
        window=window,
        min_history=min_history,
        watch=watch,
        record_refused=record_refused,
        max_consecutive=max_consecutive,
    )
    assert reasons == expected
    assert int(state.total_skips) == sum(r != "accepted" for r in expected)


def test_window_statistics_and_refused_values_stay_out():
    tx = gs.skip_on_spike(optax.sgd(1.0), sigma=2.0, window=4, min_history=3)
    state = tx.init(jnp.zeros(1))
    accepted = []
    for loss in [1.0, 2.0, 3.0, 4.0, 100.0, 5.0]:
        _, state = tx.update(jnp.ones(1), state, value=jnp.array(loss))
        if not bool(state.skipped):
            accepted.append(loss)
    assert accepted == [1.0, 2.0, 3.0, 4.0, 5.0]  # 100 is a spike: 100-2.5 > 2*1.29
    window = np.array([2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(state.loss_window, window)
    assert int(state.loss_count) == 4
    _, state = tx.update(jnp.ones(1), state, value=jnp.array(4.0))
    np.testing.assert_allclose(state.loss_mean, window.mean(), rtol=1e-6)
    np.testing.assert_allclose(state.loss_std, window.std(ddof=1), rtol=1e-6)
    m = gs.metrics(state)
    for field in ("loss_mean", "loss_std", "norm_mean", "norm_std", "skipped", "total_skips"):
        assert f"skip_on_spike/{field}" in m


def test_drops_are_never_spikes():
    tx = gs.skip_on_spike(optax.sgd(1.0), sigma=1.0, window=4, min_history=2)
    state = tx.init(jnp.zeros(1))
    for loss in [10.0, 10.1, 9.9, 10.0, 0.001]:
        _, state = tx.update(jnp.ones(1), state, value=jnp.array(loss))
        assert not bool(state.skipped)


def test_without_value_watches_the_norm_alone():
    tx = gs.skip_on_spike(optax.sgd(1.0), window=4, min_history=2, sigma=3.0)
    state = tx.init(jnp.zeros(1))
    for g in [1.0, 1.1, 0.9, 1.0]:
        _, state = tx.update(jnp.array([g]), state)
    assert int(state.loss_count) == 0 and np.isnan(state.loss)
    _, state = tx.update(jnp.array([100.0]), state)
    assert gs.SKIP_REASONS[int(state.reason)] == "norm_spike"
    loss_only = gs.skip_on_spike(optax.sgd(1.0), watch="loss")
    with pytest.raises(ValueError, match="value"):
        loss_only.update(jnp.ones(1), loss_only.init(jnp.zeros(1)))


def test_nonfinite_values_never_enter_the_window():
    tx = gs.skip_on_spike(optax.sgd(1.0), window=4, min_history=2)
    state = tx.init(jnp.zeros(1))
    for g, loss in [(1.0, 1.0), (jnp.nan, 1.0), (1.0, jnp.inf), (jnp.inf, jnp.nan), (1.0, 1.0)]:
        _, state = tx.update(jnp.array([g]), state, value=jnp.array(loss))
    assert np.isfinite(state.loss_window).all() and np.isfinite(state.norm_window).all()
    assert int(state.loss_count) == 2 and int(state.norm_count) == 2
    assert int(state.total_skips) == 3


def test_huge_finite_gradient_with_overflowing_norm_is_a_norm_spike():
    tx = gs.skip_on_spike(optax.sgd(1.0))
    _, state = tx.update(jnp.full(4, 1e30), tx.init(jnp.zeros(4)))
    # the norm is finite (its true value) but its square overflows float32: a spike even
    # without history, and it never enters the window
    np.testing.assert_allclose(float(state.norm), 2e30, rtol=1e-5)
    assert gs.SKIP_REASONS[int(state.reason)] == "norm_spike"
    assert int(state.norm_count) == 0


# ------------------------------------------------------------------------------------------
# dynamic_loss_scale: scale sequences
# ------------------------------------------------------------------------------------------


@functools.cache
def scale_scan(**kwargs):
    """A jitted scan: overflow pattern -> (scale, skipped, all updates finite) after each step."""
    tx = gs.dynamic_loss_scale(optax.sgd(1.0), **kwargs)

    def body(state, overflow):
        grads = jnp.where(overflow, jnp.array([1.0, jnp.inf]), jnp.array([1.0, 2.0]))
        updates, state = tx.update(grads, state)
        return state, (gs.loss_scale(state), state.skipped, jnp.all(jnp.isfinite(updates)))

    return jax.jit(lambda pattern: jax.lax.scan(body, tx.init(jnp.zeros(2)), pattern)[1])


def our_scales(pattern, **kwargs):
    """The scale after each step of ``pattern`` (True = the gradient overflows)."""
    scales, skipped, finite = scale_scan(**kwargs)(jnp.array(pattern, bool))
    assert np.asarray(skipped).tolist() == list(pattern)
    assert np.asarray(finite).all()
    return np.asarray(scales).tolist()


@functools.cache
def jmp_scan(period, factor, min_scale):
    """jmp.DynamicLossScale over a pattern; min_loss_scale is rebuilt each step (jmp drops it
    from its pytree)."""

    def body(carry, overflow):
        scale, counter = carry
        theirs = jmp.DynamicLossScale(
            scale, counter, period=period, factor=factor, min_loss_scale=jnp.float32(min_scale)
        )
        with jax.numpy_dtype_promotion("standard"):  # jmp mixes int32 and bool
            theirs = theirs.adjust(~overflow)
        return (theirs.loss_scale, theirs.counter), theirs.loss_scale

    def run(init, pattern):
        return jax.lax.scan(body, (init, jnp.zeros([], jnp.int32)), pattern)[1]

    return jax.jit(run)


def jmp_scales(pattern, init, period=2000, factor=2, min_scale=1.0):
    scales = jmp_scan(period, factor, min_scale)(jnp.float32(init), jnp.array(pattern, bool))
    return np.asarray(scales).tolist()


@given(st.lists(st.booleans(), min_size=48, max_size=48), st.sampled_from([1, 3, 7]))
def test_scales_match_jmp(pattern, period):
    for factor, min_scale in [(2, 1.0), (4, 64.0)]:
        expected = jmp_scales(pattern, 2.0**10, period, factor, min_scale)
        ours = our_scales(
            pattern,
            init_scale=2.0**10,
            growth_interval=period,
            growth_factor=float(factor),
            backoff_factor=1 / factor,
            min_scale=min_scale,
        )
        assert ours == expected


def test_jmp_default_settings_are_the_defaults():
    pattern = [False] * 2000 + [True] + [False] * 1999 + [True, True]
    expected = jmp_scales(pattern, 2.0**15)
    assert our_scales(pattern) == expected
    assert expected[1999] == 2.0**16 and expected[-1] == 2.0**13


def test_gradscaler_like_sequence_hand_computed():
    # torch.amp.GradScaler(init_scale=2**16, growth_factor=2, backoff_factor=0.5,
    # growth_interval=3): found_inf -> scale *= 0.5, tracker = 0; else tracker += 1 and at 3
    # scale *= 2, tracker = 0. No floor.
    pattern = [False, False, False, True, False, True, True, False, False, False]
    expected = [65536, 65536, 131072, 65536, 65536, 32768, 16384, 16384, 16384, 32768]
    settings = dict(init_scale=2.0**16, growth_interval=3, min_scale=0.0)
    assert our_scales(pattern, **settings) == expected
    # No floor: the scale halves below 1, where jmp's default floor holds it at 1.
    assert our_scales([True] * 3, init_scale=2.0, min_scale=0.0) == [1.0, 0.5, 0.25]
    assert our_scales([True] * 3, init_scale=2.0) == [1.0, 1.0, 1.0]


def test_megatron_hysteresis_hand_computed():
    # hysteresis=2: the first overflow since the last growth only decrements the tracker;
    # every later one backs off; a growth resets the tracker to 2.
    pattern = [True, True, False, True, False, False, True, True]
    expected = [1024, 512, 512, 256, 256, 512, 512, 256]
    assert our_scales(pattern, init_scale=1024.0, growth_interval=2, hysteresis=2) == expected


def test_growth_only_to_a_finite_scale():
    big = float(np.finfo(np.float32).max) / 1.5
    assert our_scales([False, False], init_scale=big, growth_interval=1) == [big, big]


def test_min_scale_survives_jit_unlike_jmp():
    assert our_scales([True] * 6, init_scale=256.0, min_scale=16.0) == [128, 64, 32, 16, 16, 16]
    theirs = jmp.DynamicLossScale(jnp.float32(256.0), min_loss_scale=jnp.float32(16.0))
    adjust = jax.jit(lambda ls, finite: ls.adjust(finite))
    for _ in range(6):
        with jax.numpy_dtype_promotion("standard"):
            theirs = adjust(theirs, jnp.array(False))
    assert float(theirs.loss_scale) == 4.0  # jmp lost its floor in the pytree round trip


def test_unscaling_float16_and_refusal_keeps_inner_state():
    params = {"h": jnp.ones(3, jnp.float16), "f": jnp.ones(2)}
    tx = gs.dynamic_loss_scale(adam(0.1), init_scale=2.0**16)
    state = tx.init(params)
    scaled = {"h": jnp.full(3, 2.0**14, jnp.float16), "f": jnp.full(2, 2.0**15)}
    inner = adam(0.1)
    expected, _ = inner.update({"h": jnp.full(3, 0.25, jnp.float16), "f": jnp.full(2, 0.5)},
                               inner.init(params), params)  # fmt: skip
    updates, new_state = tx.update(scaled, state, params)
    assert updates["h"].dtype == jnp.float16
    # The accepted step runs inside a compiled lax.cond: equal up to XLA's fused rounding.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates, expected)
    overflowed = {"h": jnp.array([jnp.inf, 1, 1], jnp.float16), "f": jnp.ones(2)}
    updates, after = tx.update(overflowed, new_state, params)
    assert_bit_identical(after.inner_state, new_state.inner_state)
    assert float(after.loss_scale) == 2.0**15 and int(after.reason) == 1
    jax.tree.map(lambda u: np.testing.assert_array_equal(u, np.zeros_like(u)), updates)


def test_nonfinite_loss_is_refused_without_backoff():
    tx = gs.dynamic_loss_scale(optax.sgd(1.0), init_scale=8.0, growth_interval=2)
    state = tx.init(jnp.zeros(1))
    _, state = tx.update(jnp.ones(1), state, value=jnp.array(1.0))
    _, state = tx.update(jnp.ones(1), state, value=jnp.array(jnp.nan))
    assert gs.SKIP_REASONS[int(state.reason)] == "nonfinite_loss"
    assert float(state.loss_scale) == 8.0 and int(state.growth_tracker) == 1


def test_loss_scale_lookup():
    params = jnp.zeros(2)
    assert float(gs.loss_scale(adam(0.1).init(params))) == 1.0
    tx = optax.chain(optax.identity(), gs.dynamic_loss_scale(optax.sgd(1.0), init_scale=4.0))
    assert float(jax.jit(gs.loss_scale)(tx.init(params))) == 4.0
    twice = optax.chain(gs.dynamic_loss_scale(optax.sgd(1.0)), gs.dynamic_loss_scale(optax.sgd(1)))
    with pytest.raises(ValueError, match="dynamic_loss_scale"):
        gs.loss_scale(twice.init(params))


# ------------------------------------------------------------------------------------------
# checkpoints and shard_map
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: gs.skip_nonfinite(adam(0.1)),
        lambda: gs.skip_on_spike(adam(0.1), window=4, min_history=2),
        lambda: gs.dynamic_loss_scale(adam(0.1), init_scale=8.0, growth_interval=2),
    ],
)
def test_checkpoint_round_trip_mid_run(make):
    tx = make()
    params = adam_params()
    update = jax.jit(tx.update)
    schedule = [0.1, 0.2, jnp.nan, 0.1, 5.0, 0.1, jnp.inf, 0.3]

    def steps(state, params, values):
        for g in values:
            grads = grads_like(params, g)
            updates, state = update(grads, state, params, value=jnp.array(1.0))
            params = optax.apply_updates(params, updates)
        return state, params

    full_state, full_params = steps(tx.init(params), params, schedule)
    half_state, half_params = steps(tx.init(params), params, schedule[:4])
    restored = flax.serialization.from_bytes(
        tx.init(params), flax.serialization.to_bytes(half_state)
    )
    assert jax.tree.structure(restored) == jax.tree.structure(half_state)
    resumed_state, resumed_params = steps(restored, half_params, schedule[4:])
    assert_bit_identical(resumed_params, full_params)
    assert_bit_identical(resumed_state, full_state)


def mesh8():
    return jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


def sharded_run(tx, grads, losses, mesh, with_state=True):
    """One update per device inside shard_map: grads (8, 3) and losses (8,) split on 'd'.

    The state comes back (replicated where it is not per-device) only ``with_state``: without
    ``axis_name`` the guard's counters differ between devices.
    """
    params = jnp.zeros((8, 3))
    state = tx.init(params)

    def spec(x):
        return P("d") if jnp.ndim(x) == 2 else P()

    state_specs = jax.tree.map(spec, state)

    def local(g, loss, state):
        updates, state = tx.update(g, state, value=loss[0])
        return (updates, state) if with_state else updates

    run = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P("d"), P("d"), state_specs),
            out_specs=(P("d"), state_specs) if with_state else P("d"),
        )
    )
    return run(grads, losses, state)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda a: gs.skip_nonfinite(adam(0.1), axis_name=a), "nonfinite_gradient"),
        (lambda a: gs.dynamic_loss_scale(adam(0.1), axis_name=a), "nonfinite_gradient"),
        (lambda a: gs.skip_on_spike(adam(0.1), axis_name=a), "nonfinite_gradient"),
    ],
)
def test_all_devices_refuse_together(make, reason):
    mesh = mesh8()
    grads = jnp.ones((8, 3)).at[5, 1].set(jnp.nan)
    losses = jnp.ones(8)
    updates, state = sharded_run(make("d"), grads, losses, mesh)
    np.testing.assert_array_equal(updates, np.zeros((8, 3)))
    assert gs.SKIP_REASONS[int(state.reason)] == reason and int(state.total_skips) == 1
    # Without axis_name only the device that saw the NaN refuses.
    updates = sharded_run(make(None), grads, losses, mesh, with_state=False)
    assert np.abs(np.asarray(updates)[0]).sum() > 0 and (np.asarray(updates)[5] == 0).all()


def test_spike_window_under_shard_map_equals_single_device():
    mesh = mesh8()
    tx = gs.skip_on_spike(optax.sgd(1.0), axis_name="d", window=4, min_history=2)
    single = gs.skip_on_spike(optax.sgd(1.0), window=4, min_history=2)
    grads = jnp.arange(24.0).reshape(8, 3) / 10
    losses = jnp.linspace(1.0, 2.0, 8)
    _, sharded_state = sharded_run(tx, grads, losses, mesh)
    _, single_state = single.update(grads, single.init(grads), value=jnp.mean(losses))
    for field in ("norm", "loss", "norm_window", "loss_window", "norm_count", "loss_count"):
        np.testing.assert_allclose(getattr(sharded_state, field), getattr(single_state, field),
                                   rtol=1e-6)  # fmt: skip


# ------------------------------------------------------------------------------------------
# bad arguments
# ------------------------------------------------------------------------------------------

SGD = optax.sgd(1.0)


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: gs.skip_nonfinite("adam"), "inner"),
        (lambda: gs.skip_nonfinite(SGD, axis_name=3), "axis_name"),
        (lambda: gs.skip_on_spike(SGD, sigma=0.0), "sigma"),
        (lambda: gs.skip_on_spike(SGD, sigma=-1.0), "sigma"),
        (lambda: gs.skip_on_spike(SGD, sigma=float("nan")), "sigma"),
        (lambda: gs.skip_on_spike(SGD, window=1), "window"),
        (lambda: gs.skip_on_spike(SGD, window=8.0), "window"),
        (lambda: gs.skip_on_spike(SGD, min_history=1), "min_history"),
        (lambda: gs.skip_on_spike(SGD, window=8, min_history=9), "min_history"),
        (lambda: gs.skip_on_spike(SGD, watch=()), "watch"),
        (lambda: gs.skip_on_spike(SGD, watch=("loss", "lr")), "watch"),
        (lambda: gs.dynamic_loss_scale(None), "inner"),
        (lambda: gs.dynamic_loss_scale(SGD, init_scale=0.0), "init_scale"),
        (lambda: gs.dynamic_loss_scale(SGD, init_scale=float("inf")), "init_scale"),
        (lambda: gs.dynamic_loss_scale(SGD, init_scale=0.5), "init_scale"),
        (lambda: gs.dynamic_loss_scale(SGD, growth_interval=0), "growth_interval"),
        (lambda: gs.dynamic_loss_scale(SGD, growth_interval=True), "growth_interval"),
        (lambda: gs.dynamic_loss_scale(SGD, growth_factor=0.5), "growth_factor"),
        (lambda: gs.dynamic_loss_scale(SGD, backoff_factor=0.0), "backoff_factor"),
        (lambda: gs.dynamic_loss_scale(SGD, backoff_factor=1.5), "backoff_factor"),
        (lambda: gs.dynamic_loss_scale(SGD, min_scale=-1.0), "min_scale"),
        (lambda: gs.dynamic_loss_scale(SGD, hysteresis=0), "hysteresis"),
        (lambda: gs.dynamic_loss_scale(SGD, axis_name=""), "axis_name"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(build, name):
    with pytest.raises(ValueError, match=name):
        build()


def test_non_scalar_value_is_rejected():
    tx = gs.skip_nonfinite(SGD)
    with pytest.raises(ValueError, match="value"):
        tx.update(jnp.ones(1), tx.init(jnp.zeros(1)), value=jnp.ones(3))


@pytest.mark.parametrize("where", ["gradient", "state"])
def test_a_nan_in_one_of_many_small_leaves_is_refused(where):
    """The finiteness checks pack small leaves together; one bad entry still counts."""
    params = {f"l{i:02d}": jnp.ones((2, 3)) for i in range(50)}
    grads = dict(params)
    if where == "gradient":
        grads["l37"] = grads["l37"].at[1, 2].set(jnp.nan)
    inner = optax.adam(1.0)
    state = gs.skip_nonfinite(inner).init(params)
    if where == "state":  # Adam's nu overflows to Inf in l37 only
        grads["l37"] = grads["l37"].at[0, 0].set(jnp.finfo(jnp.float32).max)
    with jax.numpy_dtype_promotion("standard"):  # optax.adam mixes float and int32
        updates, state = jax.jit(gs.skip_nonfinite(inner).update)(grads, state, params)
    assert all(not np.asarray(u).any() for u in jax.tree.leaves(updates))
    assert int(gs.metrics(state)["skip_nonfinite/total_skips"]) == 1


# ------------------------------------------------------------------------------------------
# the gradient check: fault tests in a whole donated training step
# ------------------------------------------------------------------------------------------


def optimizers():
    return {
        "adam": adam(1e-3),
        "sgd_momentum": optax.sgd(1e-3, momentum=0.9),
        "sgd_nesterov": optax.sgd(1e-3, momentum=0.9, nesterov=True),
        "adagrad": optax.adagrad(1e-2),
        "rmsprop": optax.rmsprop(1e-3),
        "lion": optax.lion(1e-4),
    }


def many_leaves(count=60, shape=(3, 4)):
    keys = jax.random.split(jax.random.key(0), count)
    return {f"l{i:03d}": jax.random.normal(k, shape) for i, k in enumerate(keys)}


@functools.cache
def donated_step(name, check):
    inner = optimizers()[name]
    tx = gs.skip_nonfinite(inner, check=check)

    def step(params, state, grads, loss):
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    return tx, jax.jit(step, donate_argnums=(0, 1))


def run_donated(name, check, params, grads, loss=1.0, warm_steps=2):
    """A few clean steps, then one with ``grads``: (params and state before, after)."""
    tx, step = donated_step(name, check)
    params = jax.tree.map(jnp.copy, params)
    state = tx.init(params)
    clean = jax.tree.map(lambda x: 0.1 * jnp.cos(x), params)
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(warm_steps):
            params, state = step(params, state, clean, jnp.float32(1.0))
        before = jax.tree.map(np.array, (params, state))  # host copies: the buffers are donated
        after = step(params, state, grads, jnp.float32(loss))
    return before, jax.tree.map(np.array, after)


def faulty_gradients(params):
    leaves = dict(params)
    nan = dict(leaves, l007=leaves["l007"].at[1, 2].set(jnp.nan))
    inf = dict(leaves, l042=leaves["l042"].at[0, 0].set(-jnp.inf))
    huge = jax.tree.map(lambda x: x * 1e25, params)  # finite, but g^2 overflows float32
    one_huge = dict(leaves, l013=leaves["l013"].at[2, 3].set(3e19))  # one entry: g^2 = 9e38
    return {
        "nan_in_one_small_leaf": (nan, "nonfinite_gradient"),
        "inf_in_one_small_leaf": (inf, "nonfinite_gradient"),
        "huge_finite": (huge, "gradient_overflow"),
        "one_entry_whose_square_overflows": (one_huge, "gradient_overflow"),
    }


@pytest.mark.parametrize("fault", ["nan_in_one_small_leaf", "inf_in_one_small_leaf",
                                   "huge_finite", "one_entry_whose_square_overflows"])  # fmt: skip
@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "adagrad"])
def test_gradient_check_refuses_faults_and_keeps_everything_bit_for_bit(name, fault):
    params = many_leaves()
    grads, reason = faulty_gradients(params)[fault]
    (params0, state0), (params1, state1) = run_donated(name, "gradient", params, grads)
    assert_bit_identical(params1, params0)
    assert_bit_identical(state1.inner_state, state0.inner_state)
    assert bool(state1.skipped) and gs.SKIP_REASONS[int(state1.reason)] == reason
    assert int(state1.total_skips) == int(state0.total_skips) + 1


@pytest.mark.parametrize("loss", [np.nan, np.inf])
def test_gradient_check_refuses_a_nonfinite_loss(loss):
    params = many_leaves()
    grads = jax.tree.map(lambda x: 0.5 * x, params)
    (params0, state0), (params1, state1) = run_donated("adam", "gradient", params, grads, loss)
    assert_bit_identical(params1, params0)
    assert_bit_identical(state1.inner_state, state0.inner_state)
    assert gs.SKIP_REASONS[int(state1.reason)] == "nonfinite_loss"


@pytest.mark.parametrize("name", sorted(optimizers()))
def test_largest_accepted_gradient_keeps_the_covered_optimizers_finite(name):
    """Just below the overflow limit the step is accepted, and every optimizer the docstring
    names keeps finite parameters, state and update (ten steps of the largest gradient)."""
    params = many_leaves(count=4)
    entries = sum(x.size for x in jax.tree.leaves(params))
    # every entry equal: squared norm = entries * g^2 = 0.5 * float32 max
    value = np.float32(np.sqrt(0.5 * np.finfo(np.float32).max / entries))
    grads = jax.tree.map(lambda x: jnp.full_like(x, value), params)
    tx, step = donated_step(name, "gradient")
    state = tx.init(params)
    params = jax.tree.map(jnp.copy, params)
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(10):
            params, state = step(params, state, grads, jnp.float32(1.0))
            assert not bool(state.skipped)
            for leaf in jax.tree.leaves((params, state)):
                if jnp.issubdtype(leaf.dtype, jnp.floating):
                    assert np.isfinite(np.asarray(leaf)).all()


def test_nothing_nonfinite_reaches_params_over_a_faulty_run():
    """Random faults over 30 steps: the parameters stay finite, and each refused step leaves
    them exactly as they were."""
    params = many_leaves(count=20)
    rng = np.random.default_rng(0)
    tx, step = donated_step("adam", "gradient")
    state = tx.init(params)
    params = jax.tree.map(jnp.copy, params)
    with jax.numpy_dtype_promotion("standard"):
        for i in range(30):
            grads = jax.tree.map(lambda x, i=i: jnp.sin(x + i), params)
            kind = rng.integers(4)
            leaf = f"l{rng.integers(20):03d}"
            if kind == 1:
                grads[leaf] = grads[leaf].at[0, 1].set(jnp.nan)
            elif kind == 2:
                grads[leaf] = grads[leaf] * 1e30
            before = jax.tree.map(np.array, params)
            params, state = step(params, state, grads, jnp.float32(1.0))
            after = jax.tree.map(np.array, params)
            assert all(np.isfinite(x).all() for x in jax.tree.leaves(after))
            assert bool(state.skipped) == (kind in (1, 2))
            if kind in (1, 2):
                assert_bit_identical(after, before)


def test_gradient_check_runs_inner_only_on_accepted_steps():
    """A refused step does not advance inner's state (inner is not run under lax.cond)."""

    def update_fn(updates, state, params=None):
        return updates, state + 1

    inner = optax.GradientTransformation(lambda p: jnp.zeros([], jnp.int32), update_fn)
    tx = gs.skip_nonfinite(inner)
    state = tx.init(jnp.zeros(2))
    updates, state = jax.jit(tx.update)(jnp.ones(2), state)
    assert int(state.inner_state) == 1 and not bool(state.skipped)
    updates, state = jax.jit(tx.update)(jnp.array([1.0, jnp.nan]), state)
    assert int(state.inner_state) == 1 and bool(state.skipped)
    np.testing.assert_array_equal(updates, [0.0, 0.0])


def test_check_argument_is_validated():
    with pytest.raises(ValueError, match="check"):
        gs.skip_nonfinite(SGD, check="updates")
    with pytest.raises(ValueError, match="check"):
        gs.dynamic_loss_scale(SGD, check=True)


def test_full_check_still_exempts_only_scalar_fields_of_gradsafe_states():
    """The exemption follows the state's type and shape, not metrics registration: a foreign
    state registered for logging is still checked."""

    from typing import NamedTuple

    @gs._metrics.register_stats("foreign_named", "value")
    class Foreign(NamedTuple):
        value: jax.Array

    def update_fn(updates, state, params=None):
        return updates, Foreign(state.value * jnp.inf)

    inner = optax.GradientTransformation(lambda p: Foreign(jnp.ones([])), update_fn)
    tx = gs.skip_nonfinite(inner, check="full")
    state = tx.init(jnp.zeros(2))
    _, state = tx.update(jnp.ones(2), state)
    assert gs.SKIP_REASONS[int(state.reason)] == "nonfinite_state"
    # A gradsafe clipper's scalar record of an Inf norm is not a refusal by itself.
    tx = gs.skip_nonfinite(optax.chain(gs.clip_by_global_norm(1.0), optax.sgd(0.1)), check="full")
    _, state = tx.update(jnp.array([3e38, 3e38]), tx.init(jnp.zeros(2)))
    assert gs.SKIP_REASONS[int(state.reason)] == "accepted"


def test_skip_reason_reads_the_name():
    tx = gs.skip_nonfinite(SGD)
    state = tx.init(jnp.zeros(2))
    assert gs.skip_reason(state) == "accepted"
    _, state = tx.update(jnp.array([1.0, jnp.nan]), state)
    assert gs.skip_reason(state) == "nonfinite_gradient"
    _, state = tx.update(jnp.array([1e30, 1.0]), state)
    assert gs.skip_reason(state) == "gradient_overflow"
    assert gs.skip_reason(SGD.init(jnp.zeros(2))) is None
    two = optax.chain(gs.skip_nonfinite(SGD), gs.skip_nonfinite(SGD))
    with pytest.raises(ValueError, match="guards"):
        gs.skip_reason(two.init(jnp.zeros(2)))


def test_refused_step_metrics_keep_the_inner_figures_of_the_last_accepted_step():
    tx = gs.skip_nonfinite(optax.chain(gs.clip_by_global_norm(1.0), SGD))
    state = tx.init(jnp.zeros(2))
    _, state = tx.update(jnp.array([3.0, 4.0]), state)
    _, refused = tx.update(jnp.array([jnp.nan, 4.0]), state)
    seen, now = gs.metrics(state), gs.metrics(refused)
    assert bool(now["skip_nonfinite/skipped"]) and not bool(seen["skip_nonfinite/skipped"])
    assert float(now["clip_by_global_norm/norm"]) == float(seen["clip_by_global_norm/norm"]) == 5.0


def test_dynamic_loss_scale_under_inject_hyperparams_and_jit():
    tx = optax.inject_hyperparams(gs.dynamic_loss_scale, static_args=("inner", "check"))(
        inner=SGD, init_scale=8.0, growth_interval=2
    )
    state = tx.init(jnp.zeros(2))
    update = jax.jit(tx.update)
    updates, state = update(jnp.full(2, 8.0), state)
    np.testing.assert_allclose(updates, [-1.0, -1.0])
    updates, state = update(jnp.full(2, 8.0), state)
    assert float(gs.loss_scale(state)) == 16.0
    _, state = update(jnp.array([jnp.inf, 1.0]), state)
    assert float(gs.loss_scale(state)) == 8.0 and gs.skip_reason(state) == "nonfinite_gradient"


def test_shard_map_with_the_full_check_refuses_together():
    mesh = mesh8()
    grads = jnp.ones((8, 3)).at[5, 1].set(jnp.nan)
    updates, state = sharded_run(
        gs.skip_nonfinite(adam(0.1), check="full", axis_name="d"), grads, jnp.ones(8), mesh
    )
    np.testing.assert_array_equal(updates, np.zeros((8, 3)))
    assert int(state.total_skips) == 1
