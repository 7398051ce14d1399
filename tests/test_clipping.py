"""Fixed clippers: parity with Optax, PyTorch and Keras semantics, properties and edge cases."""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradsafe as gs

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def run(tx, grads, params=None, jit=True, **extra):
    """One update of a fresh transform; returns (updates, state)."""
    state = tx.init(grads if params is None else params)
    update = jax.jit(tx.update) if jit else tx.update
    return update(grads, state, grads if params is None else params, **extra)


def tree_norm(tree):
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    return math.sqrt(sum(float(np.sum(np.abs(x) ** 2)) for x in leaves))


FIXED = {
    "clip_by_value": lambda c: gs.clip_by_value(c),
    "clip_by_global_norm": lambda c: gs.clip_by_global_norm(c),
    "clip_by_global_norm_torch": lambda c: gs.clip_by_global_norm(c, semantics="torch"),
    "clip_by_leaf_norm": lambda c: gs.clip_by_leaf_norm(c),
    "clip_by_block_rms": lambda c: gs.clip_by_block_rms(c),
    "adaptive_grad_clip": lambda c: gs.adaptive_grad_clip(c),
}

finite_arrays = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
    elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False),
)
# Each example is a new tree shape, so a new compiled program: fewer examples than the
# profile's default keep these (slow-marked) properties to seconds.
PROPERTY_SETTINGS = settings(max_examples=15)
trees = st.dictionaries(st.sampled_from("abcd"), finite_arrays, min_size=1, max_size=4)
thresholds = st.floats(1e-3, 1e3)

# ------------------------------------------------------------------------------------------
# parity with Optax (finite inputs)
# ------------------------------------------------------------------------------------------

OPTAX_CASES = [
    {"a": jnp.array([500.0, 5.0]), "b": jnp.array([300.0, 3.0])},
    {"w": jnp.arange(12.0).reshape(3, 4) - 5, "v": jnp.array([1e-3])},
    {"x": jnp.zeros(3), "y": jnp.array([0.1, -0.2])},
]


@pytest.mark.parametrize("grads", OPTAX_CASES)
@pytest.mark.parametrize("max_norm", [0.5, 1.0, 10.0, 1e4])
def test_global_norm_matches_optax(grads, max_norm):
    ours, _ = run(gs.clip_by_global_norm(max_norm), grads)
    theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-7, atol=0), ours, theirs)


@pytest.mark.parametrize("grads", OPTAX_CASES)
@pytest.mark.parametrize("delta", [0.0, 0.5, 4.0, 1e6])
def test_value_matches_optax(grads, delta):
    ours, _ = run(gs.clip_by_value(delta), grads)
    theirs, _ = optax.clip(delta).update(grads, optax.EmptyState())
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


@pytest.mark.parametrize("grads", OPTAX_CASES)
@pytest.mark.parametrize("threshold", [0.01, 0.3, 1.0, 100.0])
def test_block_rms_matches_optax(grads, threshold):
    ours, _ = run(gs.clip_by_block_rms(threshold), grads)
    theirs, _ = jax.jit(optax.clip_by_block_rms(threshold).update)(grads, optax.EmptyState())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-7, atol=0), ours, theirs)


def test_block_rms_reaches_target_like_optax_tests():
    grads = (jnp.array([500.0, 5.0]), jnp.array([300.0, 3.0]))
    for i in range(1, 51):
        # eager: the 50 thresholds share the compiled primitives (jit would compile 100 programs)
        out, _ = run(gs.clip_by_block_rms(1.0 / i), grads, jit=False)
        for leaf in out:
            rms = float(jnp.sqrt(jnp.mean(leaf**2)))
            assert rms == pytest.approx(1.0 / i, rel=1e-6)
        again, _ = run(gs.clip_by_block_rms(1.0 / i), out, jit=False)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), again, out)


AGC_PARAMS = {
    "vec": jnp.linspace(-1.0, 1.0, 5),
    "dense": jnp.arange(12.0).reshape(3, 4) / 10,
    "heads": jnp.ones((2, 3, 4)) * 0.3,
    "conv": jnp.linspace(0.0, 1.0, 2 * 2 * 3 * 4).reshape(2, 2, 3, 4),
    "conv3d": jnp.linspace(-1.0, 1.0, 2 * 2 * 2 * 3 * 2).reshape(2, 2, 2, 3, 2),
    "zero": jnp.zeros((3, 2)),
}


@pytest.mark.parametrize("clipping", [0.001, 0.01, 0.1, 1.0])
def test_agc_matches_optax(clipping):
    key = jax.random.key(0)
    grads = {
        k: jax.random.normal(jax.random.fold_in(key, i), v.shape) * 3
        for i, (k, v) in enumerate(AGC_PARAMS.items())
    }
    ours, _ = run(gs.adaptive_grad_clip(clipping), grads, AGC_PARAMS)
    theirs, _ = optax.adaptive_grad_clip(clipping).update(grads, optax.EmptyState(), AGC_PARAMS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, theirs)


def test_agc_custom_axis_and_exclude():
    params = {"body": jnp.ones((2, 3, 4, 5, 6, 7)), "head": jnp.ones((4, 2))}
    grads = jax.tree.map(lambda p: p * 100.0, params)
    with pytest.raises(ValueError, match="axis"):
        run(gs.adaptive_grad_clip(0.01), grads, params)
    tx = gs.adaptive_grad_clip(0.01, axis=(0, 1), exclude={"body": False, "head": True})
    out, state = run(tx, grads, params)
    np.testing.assert_array_equal(out["head"], grads["head"])
    unit_ratio = jnp.sqrt(jnp.sum(out["body"] ** 2, axis=(0, 1))) / jnp.sqrt(
        jnp.sum(params["body"] ** 2, axis=(0, 1))
    )
    np.testing.assert_allclose(unit_ratio, 0.01, rtol=1e-5)
    assert bool(state.clipped)
    # a callable exclude receives params
    tx = gs.adaptive_grad_clip(0.01, axis=(0, 1), exclude=lambda p: {"body": True, "head": True})
    out, state = run(tx, grads, params)
    jax.tree.map(np.testing.assert_array_equal, out, grads)
    assert not bool(state.clipped)


def test_agc_zero_params_use_eps_floor():
    params = {"w": jnp.zeros((3, 2))}
    grads = {"w": jnp.ones((3, 2))}
    out, _ = run(gs.adaptive_grad_clip(0.1, eps=1e-3), grads, params)
    np.testing.assert_allclose(jnp.sqrt(jnp.sum(out["w"] ** 2, axis=0)), 1e-4, rtol=1e-5)


def test_unit_axes_rules():
    assert gs.unit_axes((5,)) is None
    assert gs.unit_axes((1, 5, 1)) is None
    assert gs.unit_axes((3, 4)) == 0
    assert gs.unit_axes((2, 3, 4)) == 0
    assert gs.unit_axes((2, 2, 3, 4)) == (0, 1, 2)
    assert gs.unit_axes((2, 2, 2, 3, 4)) == (0, 1, 2, 3)
    assert gs.unit_axes((2,) * 6, axis=(1, 2)) == (1, 2)
    with pytest.raises(ValueError, match="axis"):
        gs.unit_axes((2,) * 6)


# ------------------------------------------------------------------------------------------
# PyTorch clip_grad_norm_ and Keras clipnorm semantics (hand-computed)
# ------------------------------------------------------------------------------------------


def test_torch_semantics_numbers():
    grads = {"a": jnp.array([3.0, 4.0])}
    out, state = run(gs.clip_by_global_norm(1.0, semantics="torch"), grads)
    coef = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(out["a"], [3 * coef, 4 * coef], rtol=1e-7)
    assert float(state.norm) == 5.0
    # a norm equal to max_norm is still scaled by c / (c + 1e-6), as torch does
    out, state = run(gs.clip_by_global_norm(5.0, semantics="torch"), grads)
    np.testing.assert_allclose(out["a"], np.array([3.0, 4.0]) * (5.0 / (5.0 + 1e-6)), rtol=1e-7)
    assert bool(state.clipped)
    # below the threshold: unchanged
    out, _ = run(gs.clip_by_global_norm(10.0, semantics="torch"), grads)
    np.testing.assert_array_equal(out["a"], grads["a"])


def test_torch_semantics_nonfinite_and_zero():
    tx = gs.clip_by_global_norm(1.0, semantics="torch")
    out, _ = run(tx, {"a": jnp.array([1.0, jnp.nan]), "b": jnp.array([2.0])})
    assert np.all(np.isnan(out["a"])) and np.all(np.isnan(out["b"]))
    out, _ = run(tx, {"a": jnp.array([1.0, jnp.inf]), "b": jnp.array([2.0])})
    np.testing.assert_array_equal(out["a"][0], 0.0)
    assert np.isnan(out["a"][1])
    np.testing.assert_array_equal(out["b"], [0.0])
    out, _ = run(gs.clip_by_global_norm(0.0, semantics="torch"), {"a": jnp.array([1.0, 2.0])})
    np.testing.assert_array_equal(out["a"], [0.0, 0.0])


@pytest.mark.parametrize("norm_type,expected", [(1, 7.0), (2, 5.0), ("inf", 4.0), (np.inf, 4.0)])
def test_norm_types(norm_type, expected):
    grads = {"a": jnp.array([3.0]), "b": jnp.array([-4.0, 0.0])}
    out, state = run(gs.clip_by_global_norm(1.0, norm_type=norm_type), grads)
    assert float(state.norm) == pytest.approx(expected)
    np.testing.assert_allclose(out["b"], [-4.0 / expected, 0.0], rtol=1e-6)


def test_leaf_norm_matches_keras_clipnorm():
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4]), "z": jnp.zeros(3)}
    out, state = run(gs.clip_by_leaf_norm(1.0), grads)
    # keras: v * c / max(||v||, c), per variable
    for k, v in grads.items():
        norm = np.linalg.norm(np.asarray(v))
        expected = np.asarray(v) * 1.0 / max(norm, 1.0)
        np.testing.assert_allclose(out[k], expected, rtol=1e-6)
    assert float(state.scale) == pytest.approx(0.2)
    assert float(state.norm) == pytest.approx(math.sqrt(25 + 0.25))


# ------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------


@given(trees, thresholds)
@PROPERTY_SETTINGS
def test_global_norm_bounds_direction_idempotence(grads, c):
    grads = jax.tree.map(jnp.asarray, grads)
    tx = gs.clip_by_global_norm(c)
    out, state = run(tx, grads)
    n = tree_norm(grads)
    assert tree_norm(out) <= c * (1 + 1e-5) + 1e-30
    if n <= c:
        jax.tree.map(np.testing.assert_array_equal, out, grads)
        assert not bool(state.clipped)
    else:
        # direction preserved: out = s * g with one s for all leaves
        s = float(state.scale)
        jax.tree.map(
            lambda o, g: np.testing.assert_allclose(o, s * g, rtol=1e-5, atol=0), out, grads
        )
    again, _ = run(tx, out)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-30), again, out)


@given(trees, thresholds)
@PROPERTY_SETTINGS
def test_leaf_norm_property(grads, c):
    grads = jax.tree.map(jnp.asarray, grads)
    out, _ = run(gs.clip_by_leaf_norm(c), grads)
    for o, g in zip(jax.tree.leaves(out), jax.tree.leaves(grads), strict=True):
        assert tree_norm(o) <= c * (1 + 1e-5) + 1e-30
        if tree_norm(g) <= c:
            np.testing.assert_array_equal(o, g)


@given(trees, thresholds)
@PROPERTY_SETTINGS
def test_value_property(grads, c):
    grads = jax.tree.map(jnp.asarray, grads)
    out, _ = run(gs.clip_by_value(c), grads)
    for o, g in zip(jax.tree.leaves(out), jax.tree.leaves(grads), strict=True):
        assert np.all(np.abs(o) <= np.float32(c))
        inside = np.abs(g) <= np.float32(c)
        np.testing.assert_array_equal(np.asarray(o)[inside], np.asarray(g)[inside])


@given(trees, thresholds)
@PROPERTY_SETTINGS
def test_block_rms_property(grads, c):
    grads = jax.tree.map(jnp.asarray, grads)
    out, _ = run(gs.clip_by_block_rms(c), grads)
    for o in jax.tree.leaves(out):
        assert float(jnp.sqrt(jnp.mean(jnp.square(o)))) <= c * (1 + 1e-5)


@given(trees, st.floats(1e-3, 1.0))
@PROPERTY_SETTINGS
def test_agc_property(grads, clipping):
    grads = jax.tree.map(jnp.asarray, grads)
    params = jax.tree.map(lambda g: jnp.ones_like(g) * 0.5, grads)
    out, _ = run(gs.adaptive_grad_clip(clipping), grads, params)
    for o, p in zip(jax.tree.leaves(out), jax.tree.leaves(params), strict=True):
        axes = gs.unit_axes(o.shape)
        o_norm = jnp.sqrt(jnp.sum(jnp.square(o), axis=axes))
        p_norm = jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(p), axis=axes)), 1e-3)
        assert bool(jnp.all(o_norm <= clipping * p_norm * (1 + 1e-5)))


# ------------------------------------------------------------------------------------------
# edge matrix
# ------------------------------------------------------------------------------------------


# Threshold at which [3, 4] is met exactly; torch semantics scale at equality (tested above).
EXACT_THRESHOLDS = {
    "clip_by_value": 4.0,
    "clip_by_global_norm": 5.0,
    "clip_by_leaf_norm": 5.0,
    "clip_by_block_rms": math.sqrt(12.5),
    "adaptive_grad_clip": 1.0,
}


@pytest.mark.parametrize("name", sorted(EXACT_THRESHOLDS))
def test_threshold_met_exactly_is_identity(name):
    grads = {"a": jnp.array([3.0, 4.0])}
    params = {"a": jnp.array([3.0, 4.0])} if name == "adaptive_grad_clip" else None
    out, state = run(FIXED[name](EXACT_THRESHOLDS[name]), grads, params)
    np.testing.assert_array_equal(out["a"], grads["a"])
    assert not bool(state.clipped)


@pytest.mark.parametrize("name", sorted(FIXED))
def test_zero_grads_zero_threshold_give_zeros(name):
    grads = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    out, _ = run(FIXED[name](0.0), grads)
    for leaf in jax.tree.leaves(out):
        np.testing.assert_array_equal(leaf, 0.0)


def test_zero_max_norm_nonzero_grads_zeroes():
    out, state = run(gs.clip_by_global_norm(0.0), {"a": jnp.array([1.0, 2.0])})
    np.testing.assert_array_equal(out["a"], [0.0, 0.0])
    assert float(state.scale) == 0.0


@pytest.mark.parametrize(
    "name", ["clip_by_global_norm", "clip_by_leaf_norm", "clip_by_block_rms", "adaptive_grad_clip"]
)
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_nonfinite_norm_passes_through_and_is_recorded(name, bad):
    grads = {"a": jnp.array([1.0, bad]), "b": jnp.array([30.0, 40.0])}
    params = jax.tree.map(jnp.ones_like, grads) if name == "adaptive_grad_clip" else None
    out, state = run(FIXED[name](1.0), grads, params)
    np.testing.assert_array_equal(out["a"], grads["a"])
    if name != "clip_by_global_norm":
        # per-leaf clippers still clip the finite leaves
        assert float(jnp.linalg.norm(out["b"])) < 50.0
    else:
        np.testing.assert_array_equal(out["b"], grads["b"])
    assert not np.isfinite(float(state.norm))


def test_value_clip_nan_and_inf():
    out, state = run(gs.clip_by_value(1.0), {"a": jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.5])})
    np.testing.assert_array_equal(out["a"], [np.nan, 1.0, -1.0, 0.5])
    assert bool(state.clipped)


def test_fp16_norm_1e4_does_not_overflow():
    grads = {"a": jnp.full((4,), 5e3, jnp.float16)}  # norm 1e4, sum of squares 1e8 > fp16 max
    out, state = run(gs.clip_by_global_norm(1.0), grads)
    assert out["a"].dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out["a"], np.float32), 0.5, rtol=1e-3)
    assert float(state.norm) == pytest.approx(1e4)
    # Optax's float16 norm overflows and returns an all-zero update
    theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    assert float(jnp.max(jnp.abs(theirs["a"]))) == 0.0


@pytest.mark.parametrize("name", sorted(FIXED))
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.complex64])
def test_dtypes_are_kept(name, dtype):
    if dtype == jnp.complex64 and name == "adaptive_grad_clip":
        params = {"a": jnp.ones(3, dtype), "m": jnp.ones((2, 2), jnp.float32)}
    else:
        params = None
    grads = {"a": (jnp.arange(3) * 10).astype(dtype), "m": jnp.ones((2, 2), jnp.float32)}
    out, _ = run(FIXED[name](1.0), grads, params)
    assert out["a"].dtype == dtype and out["m"].dtype == jnp.float32


def test_complex_norm_uses_modulus():
    grads = {"z": jnp.array([3 + 4j, 0j], jnp.complex64)}
    out, state = run(gs.clip_by_global_norm(1.0), grads)
    assert float(state.norm) == pytest.approx(5.0)
    np.testing.assert_allclose(out["z"], [0.6 + 0.8j, 0j], rtol=1e-6)
    out, _ = run(gs.clip_by_value(1.0), {"z": jnp.array([3 - 0.5j], jnp.complex64)})
    np.testing.assert_allclose(out["z"], [1 - 0.5j])


def test_bf16_grads_with_strong_f32_threshold():
    grads = {"a": jnp.array([3.0, 4.0], jnp.bfloat16)}
    out, _ = run(gs.clip_by_global_norm(jnp.asarray(1.0, jnp.float32)), grads)
    assert out["a"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out["a"], np.float32), [0.6, 0.8], rtol=1e-2)


@pytest.mark.parametrize("name", sorted(FIXED))
def test_passthrough_leaves(name):
    grads = {
        "i": jnp.array([100, -200], jnp.int32),
        "b": jnp.array([True, False]),
        "f0": np.zeros((2,), jax.dtypes.float0),
        "n": None,
        "m": optax.MaskedNode(),
        "x": jnp.array([30.0, 40.0]),
        "empty": jnp.zeros((0, 3)),
    }
    out, state = run(FIXED[name](1.0), grads)
    np.testing.assert_array_equal(out["i"], grads["i"])
    assert out["i"].dtype == jnp.int32
    np.testing.assert_array_equal(out["b"], grads["b"])
    assert out["f0"].dtype == jax.dtypes.float0
    assert out["n"] is None and out["m"] == optax.MaskedNode()
    assert out["empty"].shape == (0, 3)
    if name in ("clip_by_global_norm", "clip_by_leaf_norm"):
        assert float(state.norm) == pytest.approx(50.0)  # ints and bools count toward nothing


def test_float64_under_x64():
    with jax.enable_x64(True):
        grads = {"a": jnp.array([3.0, 4.0], jnp.float64), "b": jnp.array([0.0], jnp.float32)}
        out, state = run(gs.clip_by_global_norm(1.0), grads)
        assert out["a"].dtype == jnp.float64 and out["b"].dtype == jnp.float32
        np.testing.assert_allclose(out["a"], [0.6, 0.8], rtol=1e-15)
        assert state.norm.dtype == jnp.float32


def test_state_is_stable_under_lax_cond_and_scan():
    grads = {"a": jnp.array([3.0, 4.0], jnp.bfloat16), "b": jnp.ones(2)}
    for name, factory in FIXED.items():
        tx = factory(1.0)
        state = tx.init(grads)
        out_state = jax.eval_shape(lambda s, tx=tx: tx.update(grads, s, grads)[1], state)
        assert jax.tree.structure(out_state) == jax.tree.structure(state), name
        for a, b in zip(jax.tree.leaves(out_state), jax.tree.leaves(state), strict=True):
            assert (a.shape, a.dtype) == (b.shape, b.dtype), name

        def body(s, g, tx=tx):
            return tx.update(g, s, g)[1], None

        final, _ = jax.lax.scan(body, state, jax.tree.map(lambda x: jnp.stack([x] * 3), grads))
        assert int(final.count) == 3


def test_counter_saturates():
    tx = gs.clip_by_global_norm(1.0)
    state = tx.init({"a": jnp.ones(1)})._replace(count=jnp.array(2**31 - 1, jnp.int32))
    _, state = tx.update({"a": jnp.ones(1)}, state)
    assert int(state.count) == 2**31 - 1


# ------------------------------------------------------------------------------------------
# bad arguments
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,argument",
    [
        (lambda: gs.clip_by_value(-1.0), "max_delta"),
        (lambda: gs.clip_by_value(float("nan")), "max_delta"),
        (lambda: gs.clip_by_global_norm(-1.0), "max_norm"),
        (lambda: gs.clip_by_global_norm(float("inf")), "max_norm"),
        (lambda: gs.clip_by_global_norm(jnp.array([1.0, 2.0])), "max_norm"),
        (lambda: gs.clip_by_global_norm("1.0"), "max_norm"),
        (lambda: gs.clip_by_global_norm(1.0, semantics="keras"), "semantics"),
        (lambda: gs.clip_by_global_norm(1.0, norm_type=3), "norm_type"),
        (lambda: gs.clip_by_global_norm(1.0, norm_type="fro"), "norm_type"),
        (lambda: gs.clip_by_global_norm(1.0, axis_name=3), "axis_name"),
        (lambda: gs.clip_by_leaf_norm(-0.1), "max_norm"),
        (lambda: gs.clip_by_block_rms(float("-inf")), "threshold"),
        (lambda: gs.adaptive_grad_clip(-0.01), "clipping"),
        (lambda: gs.adaptive_grad_clip(0.01, eps=-1.0), "eps"),
        (lambda: gs.adaptive_grad_clip(0.01, eps=lambda s: s), "eps"),
    ],
)
def test_bad_arguments_name_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def test_agc_requires_params():
    tx = gs.adaptive_grad_clip(0.01)
    grads = {"w": jnp.ones((2, 2))}
    state = tx.init(grads)
    with pytest.raises(ValueError, match="params"):
        tx.update(grads, state)
    with pytest.raises(ValueError, match="params"):
        tx.update(grads, state, None)


def test_bad_input_loses_nothing():
    """A rejected call leaves the caller's gradients and state untouched."""
    tx = gs.adaptive_grad_clip(0.01)
    grads = {"w": jnp.ones((2, 2))}
    state = tx.init(grads)
    before = jax.tree.map(np.array, (grads, state))
    with pytest.raises(ValueError):
        tx.update(grads, state)
    after = jax.tree.map(np.array, (grads, state))
    jax.tree.map(np.testing.assert_array_equal, before, after)
