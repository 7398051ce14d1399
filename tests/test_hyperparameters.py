"""Hyperparameters that arrive as arrays, traced values or bad values (issue 12).

Covers: norm_type validation (defect 4), spike_clip's warm-up (5), (1,)-shaped values (6),
Python-float leaves (8), bfloat16 hyperparameters (9), out-of-range traced thresholds (11)
and the smaller argument checks (12).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gradsafe as gs
from gradsafe import _checks
from gradsafe import _numerics as nx

GRADS = {"w": jnp.array([3.0, -4.0, 0.5]), "b": jnp.array([-2.0])}

# --------------------------------------------------------------------------------------------
# norm_type (defect 4)
# --------------------------------------------------------------------------------------------

BAD_NORM_TYPES = [3, 0, 0.5, -2, "l2", "fro", True, [1, 2], None]


@pytest.mark.parametrize("bad", BAD_NORM_TYPES, ids=repr)
def test_norm_functions_reject_unknown_norm_types(bad):
    for call in (
        lambda: gs.global_norm(GRADS, bad),
        lambda: gs.leaf_norms(GRADS, bad),
        lambda: gs.largest_leaves(GRADS, 2, bad),
        lambda: gs.leaf_norms({}, bad),
        lambda: gs.clip_by_global_norm(1.0, norm_type=bad),
    ):
        with pytest.raises(ValueError, match="norm_type"):
            call()


@pytest.mark.parametrize(("p", "expected"), [(1, 9.5), (2, 5.408326913), ("inf", 4.0)])
def test_norm_types_accepted(p, expected):
    np.testing.assert_allclose(float(gs.global_norm(GRADS, p)), expected, rtol=1e-6)
    np.testing.assert_allclose(float(gs.global_norm(GRADS, np.array([2.0]))), 5.408326913)


def test_traced_unknown_norm_type_gives_nan_not_the_inf_norm():
    norm = jax.jit(gs.global_norm)(GRADS, jnp.asarray(3.0))
    assert np.isnan(float(norm))
    np.testing.assert_allclose(float(jax.jit(gs.global_norm)(GRADS, jnp.asarray(1.0))), 9.5)


# --------------------------------------------------------------------------------------------
# (1,)-shaped hyperparameters (defect 6)
# --------------------------------------------------------------------------------------------

ONE = np.array([0.5], np.float32)
SHAPED = {
    "clip_by_global_norm": lambda: gs.clip_by_global_norm(ONE),
    "clip_by_leaf_norm": lambda: gs.clip_by_leaf_norm(ONE),
    "clip_by_value": lambda: gs.clip_by_value(ONE),
    "clip_by_block_rms": lambda: gs.clip_by_block_rms(ONE),
    "zclip": lambda: gs.zclip(alpha=np.array([0.9]), z_thresh=np.array([2.0]), max_norm=ONE),
    "decay": lambda: gs.decay(ONE),
    "decay_schedule": lambda: gs.decay(lambda step: jnp.full((1,), 0.5)),
    "cooldown_on_spike": lambda: gs.cooldown_on_spike(factor=ONE, z_thresh=np.array([2.0])),
    "spike_clip": lambda: gs.spike_clip(threshold=np.array([4.0]), beta2=ONE),
    "adagc": lambda: gs.adagc(relative=np.array([1.1]), beta=ONE, warmup_steps=1),
}


@pytest.mark.parametrize("name", sorted(SHAPED))
def test_shape_one_hyperparameters_keep_state_and_leaf_shapes_under_scan(name):
    tx = SHAPED[name]()
    grads = {"w": jnp.array([3.0, -4.0]), "s": jnp.array(2.0)}
    state = tx.init(grads)

    def body(state, g):
        out, state = tx.update(g, state, grads)
        return state, out

    steps = jax.tree.map(lambda x: jnp.stack([x, 2 * x, 0.5 * x]), grads)
    final, outs = jax.lax.scan(body, state, steps)
    assert jax.tree.map(jnp.shape, final) == jax.tree.map(jnp.shape, state)
    assert outs["s"].shape == (3,)  # the scalar leaf stays a scalar at every step


def test_a_hyperparameter_with_several_entries_is_rejected():
    with pytest.raises(ValueError, match="max_norm"):
        gs.clip_by_global_norm(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="scalar"):
        nx.resolve(lambda step: jnp.ones(2), jnp.int32(0))


# --------------------------------------------------------------------------------------------
# Python-float leaves (defect 8)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: gs.global_norm({"a": 3.0, "b": jnp.ones(2)}),
        lambda: gs.clip_by_global_norm(1.0).update(
            {"a": 3.0}, gs.clip_by_global_norm(1.0).init({})
        ),
        lambda: gs.leaf_norms({"a": 1.5}),
        lambda: gs.spike_clip().init({"a": 1.5}),
    ],
)
def test_python_float_leaves_raise_a_clear_error(call):
    with pytest.raises(ValueError, match="Python float leaf"):
        call()


def test_python_int_and_numpy_scalar_leaves_are_fine():
    tx = gs.clip_by_global_norm(1.0)
    grads = {"n": 3, "x": np.float32(4.0)}
    out, state = tx.update(grads, tx.init(grads))
    assert out["n"] == 3
    np.testing.assert_allclose(float(state.norm), 4.0)
    np.testing.assert_allclose(float(out["x"]), 1.0)


# --------------------------------------------------------------------------------------------
# bfloat16 hyperparameters and inject_hyperparams (defect 9)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.int32])
def test_check_scalar_accepts_every_real_dtype(dtype):
    _checks.check_scalar("x", jnp.asarray(1, dtype))
    _checks.check_scalar("x", np.asarray(1, dtype))
    with pytest.raises(ValueError, match="x must be in"):
        _checks.check_scalar("x", jnp.asarray(-1, dtype))


def test_check_scalar_rejects_bool_and_complex():
    for bad in (True, np.array(True), jnp.asarray(1 + 1j)):
        with pytest.raises(ValueError, match="x must be"):
            _checks.check_scalar("x", bad)


@pytest.mark.parametrize(
    "factory",
    [gs.clip_by_global_norm, gs.clip_by_leaf_norm, gs.clip_by_block_rms, gs.clip_by_value],
)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_inject_hyperparams_with_low_precision_params(factory, dtype):
    params = {"w": jnp.array([3.0, -4.0], dtype)}
    tx = optax.inject_hyperparams(factory)(1.0)
    state = tx.init(params)
    out, state = jax.jit(tx.update)(params, state, params)
    assert out["w"].dtype == dtype
    assert np.all(np.abs(np.asarray(out["w"], np.float32)) <= 4.0)


def test_old_names_stay_importable_from_numerics():
    for name in ("check_scalar", "check_int", "check_choice", "check_axis_name", "require_params"):
        assert getattr(nx, name) is getattr(_checks, name)


# --------------------------------------------------------------------------------------------
# Out-of-range traced thresholds never reverse or amplify (defect 11)
# --------------------------------------------------------------------------------------------

INJECTED = {
    "clip_by_global_norm": (gs.clip_by_global_norm, "max_norm", {}),
    "clip_by_global_norm_torch": (gs.clip_by_global_norm, "max_norm", {"semantics": "torch"}),
    "clip_by_leaf_norm": (gs.clip_by_leaf_norm, "max_norm", {}),
    "clip_by_value": (gs.clip_by_value, "max_delta", {}),
    "clip_by_block_rms": (gs.clip_by_block_rms, "threshold", {}),
    "adaptive_grad_clip": (gs.adaptive_grad_clip, "clipping", {}),
    "zclip": (gs.zclip, "max_norm", {}),
    "autoclip": (gs.autoclip, "percentile", {"window": 4}),
    "spike_clip": (gs.spike_clip, "threshold", {"warmup_steps": 1}),
    "cooldown_on_spike": (gs.cooldown_on_spike, "factor", {"warmup_steps": 1}),
    "adagc": (gs.adagc, "relative", {"warmup_steps": 1}),
    "clip_update_relative": (gs.clip_update_relative, "relative", {}),
    "prox_l1": (gs.prox_l1, "l1reg", {"learning_rate": 1.0}),
    "prox_group_lasso": (gs.prox_group_lasso, "l2reg", {"learning_rate": 1.0}),
}


def assert_never_reversed_or_amplified(out, grads):
    for o, g in zip(jax.tree.leaves(out), jax.tree.leaves(grads), strict=True):
        o, g = np.asarray(o, np.float64), np.asarray(g, np.float64)
        assert np.all(np.abs(o) <= np.abs(g) * (1 + 1e-6)), (o, g)
        assert np.all(o * g >= 0), (o, g)


@pytest.mark.parametrize("name", sorted(INJECTED))
@pytest.mark.parametrize("bad", [-0.5, -1e6, float("nan")])
def test_a_bad_traced_threshold_never_reverses_or_amplifies(name, bad):
    factory, argument, kwargs = INJECTED[name]
    params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([0.3])}
    static = ("window",) if "window" in kwargs else ()
    tx = optax.inject_hyperparams(factory, static_args=static)(**{argument: 1.0}, **kwargs)
    state = tx.init(params)
    update = jax.jit(tx.update)
    # Two good steps feed the statistics of the adaptive clippers.
    for g in (params, jax.tree.map(lambda x: 0.9 * x, params)):
        _, state = update(g, state, params)
    state.hyperparams[argument] = jnp.asarray(bad, jnp.float32)
    grads = jax.tree.map(lambda x: 50.0 * x, params)
    if name.startswith("prox"):  # the update of a proximal step is measured from w + u
        grads = jax.tree.map(lambda x: -x, params)
    out, _ = update(grads, state, params)
    assert_never_reversed_or_amplified(out, grads)


@given(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1e30))
def test_clip_factor_is_always_in_zero_one(threshold, norm):
    for kwargs in ({}, {"always": True, "eps": 1e-6}, {"floor": 1e-6}):
        factor = float(nx.clip_factor(jnp.float32(norm), jnp.float32(threshold), **kwargs))
        assert 0.0 <= factor <= 1.0


# --------------------------------------------------------------------------------------------
# Argument checks (defect 12) and spike_clip's warm-up (defect 5)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_zclip_skip_update_on_spike_must_be_a_bool(bad):
    with pytest.raises(ValueError, match="skip_update_on_spike"):
        gs.zclip(skip_update_on_spike=bad)


@pytest.mark.parametrize("bad", ["x", 1.5, (0, "a"), True])
def test_adaptive_grad_clip_axis_must_be_ints(bad):
    with pytest.raises(ValueError, match="axis"):
        gs.adaptive_grad_clip(axis=bad)
    gs.adaptive_grad_clip(axis=(0, 1))
    gs.adaptive_grad_clip(axis=-1)


def test_adagc_refuses_updates_with_another_tree():
    tx = gs.adagc(warmup_steps=1)
    state = tx.init({"a": jnp.ones(2), "b": jnp.ones(3)})
    with pytest.raises(ValueError, match="adagc"):
        tx.update({"a": jnp.ones(2)}, state)


@pytest.mark.parametrize("warmup_steps", [0, 1])
def test_spike_clip_with_short_warmup_does_not_zero_updates_forever(warmup_steps):
    tx = gs.spike_clip(threshold=5000.0, warmup_steps=warmup_steps)
    grads = jnp.array([1.0, -2.0, 0.5])
    state = tx.init(grads)
    update = jax.jit(tx.update)
    for _ in range(5):
        out, state = update(grads, state)
        np.testing.assert_array_equal(out, grads)
    spiked, state = update(grads * 1e6, state)
    assert bool(state.clipped)
    assert np.all(np.abs(np.asarray(spiked)) < 1e6)


def test_spike_clip_does_not_clip_an_entry_without_history():
    tx = gs.spike_clip(threshold=4.0, beta2=0.5, warmup_steps=1)
    state = tx.init(jnp.zeros(2))
    _, state = tx.update(jnp.array([1.0, 0.0]), state)  # entry 1 has v = 0
    out, state = tx.update(jnp.array([10.0, 3.0]), state)
    np.testing.assert_allclose(out, [np.sqrt(4.0 * 0.5), 3.0], rtol=1e-6)
