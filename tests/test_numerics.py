"""The numerics core: leaf rules, norms, safe scale factors, validation, reductions."""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradsafe import _numerics as nx


def test_float_leaf_rules():
    assert nx.is_float_leaf(jnp.ones(2))
    assert nx.is_float_leaf(jnp.ones(2, jnp.bfloat16))
    assert nx.is_float_leaf(jnp.ones(2, jnp.complex64))
    assert nx.is_float_leaf(np.ones(2, np.float16))
    assert not nx.is_float_leaf(jnp.ones(2, jnp.int32))
    assert not nx.is_float_leaf(jnp.ones(2, bool))
    assert not nx.is_float_leaf(np.zeros(2, jax.dtypes.float0))
    assert not nx.is_float_leaf(None)
    assert not nx.is_float_leaf(optax.MaskedNode())
    assert not nx.is_float_leaf(3)  # Python ints pass through like integer arrays
    assert nx.is_float_leaf(np.float32(3.0))  # NumPy scalars have a dtype
    for scalar in (3.0, 1j):  # Python floats would be skipped silently: refused instead
        with pytest.raises(ValueError, match="Python"):
            nx.is_float_leaf(scalar)


def test_accumulation_dtypes():
    assert nx.accumulation_dtype(jnp.float16) == jnp.float32
    assert nx.accumulation_dtype(jnp.bfloat16) == jnp.float32
    assert nx.accumulation_dtype(jnp.complex64) == jnp.float32
    assert nx.accumulation_dtype(np.float64) == np.float64
    assert nx.accumulation_dtype(np.complex128) == np.float64


vectors = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=2, max_side=6),
    elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False),
)


@given(st.lists(vectors, min_size=1, max_size=4))
def test_global_norm_matches_numpy(leaves):
    flat = np.concatenate([np.ravel(x).astype(np.float64) for x in leaves])
    tree = [jnp.asarray(x) for x in leaves]
    np.testing.assert_allclose(nx.global_norm(tree, 2), np.linalg.norm(flat), rtol=1e-5)
    np.testing.assert_allclose(nx.global_norm(tree, 1), np.sum(np.abs(flat)), rtol=1e-5)
    np.testing.assert_allclose(nx.global_norm(tree, "inf"), np.max(np.abs(flat)), rtol=1e-6)


def test_small_leaves_are_packed_by_dtype():
    small = [jnp.ones((3, 2)), jnp.ones(4), jnp.ones((), jnp.bfloat16), jnp.ones(2, jnp.bfloat16)]
    big = jnp.ones(nx.PACK_MAX_SIZE + 1)
    packed = nx.pack_small_leaves([*small, big])
    assert [(x.shape, x.dtype) for x in packed] == [
        (big.shape, jnp.float32),
        ((10,), jnp.float32),
        ((3,), jnp.bfloat16),
    ]
    assert nx.pack_small_leaves([small[1]])[0] is small[1]  # a lone leaf is not copied
    assert nx.pack_small_leaves([]) == []


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_packed_global_norm_equals_the_per_leaf_one(monkeypatch, p):
    keys = jax.random.split(jax.random.key(0), 40)
    tree = {
        f"l{i}": jax.random.normal(k, (i % 7 + 1, 3), (jnp.float32, jnp.bfloat16)[i % 2])
        for i, k in enumerate(keys)
    }
    tree["big"] = jnp.linspace(-3, 3, nx.PACK_MAX_SIZE * 2)
    tree["c"] = jnp.array([3 + 4j, 1j], jnp.complex64)
    packed_eager, packed_jit = nx.global_norm(tree, p), jax.jit(nx.global_norm)(tree, p)
    grad_packed = jax.grad(lambda t: nx.global_norm(t, p))(tree)
    monkeypatch.setattr(nx, "PACK_MAX_SIZE", -1)
    per_leaf = nx.global_norm(tree, p)
    grad_per_leaf = jax.grad(lambda t: nx.global_norm(t, p))(tree)
    np.testing.assert_allclose(packed_eager, per_leaf, rtol=1e-6)
    np.testing.assert_allclose(packed_jit, per_leaf, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad_packed), jax.tree.leaves(grad_per_leaf), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a.astype(jnp.complex64), b.astype(jnp.complex64), rtol=1e-2)


def test_global_norm_fp16_and_bf16_accumulate_in_f32():
    tree = {"h": jnp.full((100,), 1e3, jnp.float16), "b": jnp.full((4,), 3e3, jnp.bfloat16)}
    norm = nx.global_norm(tree)
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(norm, math.sqrt(100 * 1e6 + 4 * 9e6), rtol=1e-3)


def test_global_norm_empty_and_passthrough():
    assert float(nx.global_norm({})) == 0.0
    assert float(nx.global_norm({"i": jnp.array([5]), "n": None, "e": jnp.zeros((0,))})) == 0.0
    assert float(nx.global_norm(jnp.zeros((0, 4)), "inf")) == 0.0


def test_global_norm_complex_and_float64():
    assert float(nx.global_norm(jnp.array([3 + 4j], jnp.complex64))) == pytest.approx(5.0)
    assert float(nx.global_norm(jnp.array([3 + 4j], jnp.complex64), "inf")) == pytest.approx(5.0)
    with jax.enable_x64(True):
        norm = nx.global_norm({"a": jnp.array([1e-200, 0.0], jnp.float64)})
        assert norm.dtype == jnp.float64 and float(norm) == pytest.approx(1e-200)


def test_global_norm_non_finite_is_kept():
    assert np.isnan(float(nx.global_norm(jnp.array([1.0, jnp.nan]))))
    assert np.isinf(float(nx.global_norm(jnp.array([1.0, jnp.inf]))))
    assert np.isnan(float(nx.global_norm(jnp.array([1.0, jnp.nan]), 1)))
    assert np.isnan(float(nx.global_norm(jnp.array([1.0, jnp.nan]), "inf")))


def test_rescued_norms_per_row_and_of_single_entries():
    """The overflow branch recomputes only the norms that need it (a row of ordinary size
    keeps its norm), and single entries, whose squares XLA would fold with the rescaling
    constant, keep their magnitude."""
    rows = jnp.array([[3e19, 4e19], [1.0, 0.0], [3e-15, 4e-15], [jnp.nan, 1.0], [jnp.inf, 1.0]])
    norms = jax.jit(lambda x: nx.leaf_norm(x, 2, axis=1))(rows)
    np.testing.assert_allclose(norms[:3], [5e19, 1.0, 5e-15], rtol=1e-6)
    assert np.isnan(float(norms[3])) and np.isinf(float(norms[4]))
    big = jnp.float32(5.97e31)
    for tree in (big, jnp.full((1,), big), {"a": big, "b": jnp.ones(2**17)}):
        assert float(jax.jit(nx.global_norm)(tree)) == pytest.approx(5.97e31, rel=1e-6)
    column = jax.jit(lambda x: nx.leaf_norm(x, 2, axis=1))(jnp.full((4, 1), big))
    np.testing.assert_allclose(column, [5.97e31] * 4, rtol=1e-6)
    scalars = jax.jit(nx.leaf_norms_of)([big, jnp.array([3e38, 3e38])])
    assert float(scalars[0]) == pytest.approx(5.97e31, rel=1e-6)
    assert float(scalars[1]) == float(jnp.finfo(jnp.float32).max)  # saturated


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_inf_norm_of_a_large_array_sees_one_non_finite_entry(bad):
    """XLA:CPU's fused max reduction (arrays of 2**14 entries and more) skips NaN entries;
    the inf-norms must not."""
    x = jnp.ones(2**16).at[12345].set(bad)
    norms = [
        jax.jit(lambda x: nx.global_norm(x, "inf"))(x),
        jax.jit(lambda x: nx.leaf_norm(x, math.inf))(x),
        jax.jit(lambda x: nx.leaf_norm(x.reshape(-1, 64), math.inf, axis=1))(x)[12345 // 64],
    ]
    assert not any(np.isfinite(float(n)) for n in norms)
    assert float(jax.jit(lambda x: nx.global_norm(x, "inf"))(x.at[12345].set(7.0))) == 7.0


def test_traced_norm_type_selects_the_same_norm():
    tree = {"a": jnp.array([3.0, -4.0])}
    for p, expected in ((1.0, 7.0), (2.0, 5.0), (math.inf, 4.0)):
        value = jax.jit(lambda p: nx.global_norm(tree, p))(jnp.asarray(p))
        assert float(value) == pytest.approx(expected)


def test_safe_sqrt_gradient_at_zero():
    assert float(jax.grad(nx.safe_sqrt)(jnp.array(0.0))) == 0.0
    assert float(jax.grad(nx.safe_sqrt)(jnp.array(4.0))) == pytest.approx(0.25)
    grad = jax.grad(lambda x: nx.global_norm(x))(jnp.zeros(3))
    np.testing.assert_array_equal(grad, 0.0)
    assert np.isnan(float(nx.safe_sqrt(jnp.array(jnp.nan))))


@given(st.floats(0, 1e6), st.floats(0, 1e6))
def test_clip_scale(norm, threshold):
    scale = float(
        nx.clip_scale(jnp.asarray(norm, jnp.float32), jnp.asarray(threshold, jnp.float32))
    )
    n32, t32 = float(np.float32(norm)), float(np.float32(threshold))
    if n32 == 0 and t32 < 1e-12:  # the zero norm may hide squares that underflowed
        assert scale == 0.0
    elif n32 <= t32:
        assert scale == 1.0
    else:
        assert scale == pytest.approx(t32 / n32, rel=1e-6)
        assert scale * n32 <= t32 * (1 + 1e-6)


def test_clip_scale_edges_and_gradient():
    # a zero norm below a tiny threshold zeroes (it may be a sum of squares that underflowed)
    assert float(nx.clip_scale(jnp.array(0.0), jnp.array(0.0))) == 0.0
    assert float(nx.clip_scale(jnp.array(0.0), jnp.array(1e-13))) == 0.0
    assert float(nx.clip_scale(jnp.array(0.0), jnp.array(1e-11))) == 1.0
    assert float(nx.clip_factor(jnp.array(0.0), jnp.array(0.0), exact_zero=True)) == 1.0
    assert float(nx.clip_scale(jnp.array(jnp.nan), jnp.array(1.0))) == 1.0
    assert float(nx.clip_scale(jnp.array(jnp.inf), jnp.array(1.0))) == 1.0
    assert float(nx.clip_scale(jnp.array(2.0), jnp.array(0.0))) == 0.0
    for n, t in ((0.0, 0.0), (0.0, 1.0), (2.0, 1.0)):
        grads = jax.grad(nx.clip_scale, argnums=(0, 1))(jnp.array(n), jnp.array(t))
        assert all(np.isfinite(float(g)) for g in grads)


def test_scale_tree_keeps_dtypes_and_passthrough():
    tree = {
        "h": jnp.ones(2, jnp.float16),
        "i": jnp.array([3]),
        "n": None,
        "c": jnp.ones(1, jnp.complex64),
    }
    out = nx.scale_tree(tree, jnp.asarray(0.5, jnp.float32))
    assert out["h"].dtype == jnp.float16 and float(out["h"][0]) == 0.5
    assert out["c"].dtype == jnp.complex64
    np.testing.assert_array_equal(out["i"], [3])
    assert out["n"] is None


def test_tree_all_finite():
    assert bool(nx.tree_all_finite({}))
    assert bool(nx.tree_all_finite({"a": jnp.ones(2), "i": jnp.array([1])}))
    assert not bool(nx.tree_all_finite({"a": jnp.array([1.0, jnp.inf])}))
    assert not bool(nx.tree_all_finite([jnp.ones(1), jnp.array([jnp.nan], jnp.bfloat16)]))


def test_resolve_numbers_arrays_and_schedules():
    count = jnp.array(3, jnp.int32)
    assert float(nx.resolve(2.0, count)) == 2.0
    assert nx.resolve(jnp.asarray(2.0, jnp.bfloat16), count).dtype == jnp.float32
    assert float(nx.resolve(lambda step: 1.0 / (step + 1), count)) == 0.25
    assert float(nx.resolve(optax.linear_schedule(1.0, 0.0, 6), count)) == 0.5


def test_safe_increment_saturates():
    assert int(nx.safe_increment(nx.zero_count())) == 1
    top = jnp.array(np.iinfo(np.int32).max, jnp.int32)
    assert int(nx.safe_increment(top)) == np.iinfo(np.int32).max


@pytest.mark.parametrize(
    "value,kwargs",
    [
        (-1.0, {}),
        (float("nan"), {}),
        (float("inf"), {}),
        (0.0, {"lower_inclusive": False}),
        (2.0, {"upper": 1.0}),
        (1.0, {"upper": 1.0, "upper_inclusive": False}),
        (True, {}),
        ("1", {}),
        (jnp.ones(2), {}),
        (lambda step: step, {"allow_schedule": False}),
    ],
)
def test_check_scalar_rejects_and_names_argument(value, kwargs):
    with pytest.raises(ValueError, match="my_arg"):
        nx.check_scalar("my_arg", value, **kwargs)


@pytest.mark.parametrize("value", [0.0, 1, 0.5, np.float32(2.0), jnp.asarray(3.0), jnp.ones(1)])
def test_check_scalar_accepts(value):
    nx.check_scalar("my_arg", value)
    nx.check_scalar("my_arg", lambda step: step)


def test_check_scalar_skips_tracers():
    jax.jit(lambda x: nx.check_scalar("my_arg", x) or x)(jnp.asarray(-1.0))


def test_check_norm_type_and_axis_name():
    for ok in (1, 2, 2.0, np.inf, "inf", jnp.asarray(2.0)):
        nx.check_norm_type(ok)
    for bad in (0, 3, -1, "l2", jnp.ones(2)):
        with pytest.raises(ValueError, match="norm_type"):
            nx.check_norm_type(bad)
    for ok in (None, "x", ("x", "y")):
        nx.check_axis_name(ok)
    for bad in (1, "", ("x", 2)):
        with pytest.raises(ValueError, match="axis_name"):
            nx.check_axis_name(bad)


def test_require_params_uses_optax_message():
    with pytest.raises(ValueError, match="requires the current value of parameters"):
        nx.require_params(None)
    nx.require_params({})


def test_reduce_across_devices_counts_replicated_leaves_once():
    mesh = jax.make_mesh((8,), ("x",))
    sharded = jax.device_put(jnp.ones(8), jax.NamedSharding(mesh, jax.P("x")))
    replicated = jax.device_put(jnp.ones(3), jax.NamedSharding(mesh, jax.P()))

    def body(a, b):
        total = nx.reduce_across_devices([jnp.sum(a), jnp.sum(b)], [a, b], "x")
        biggest = nx.reduce_across_devices([jnp.max(a), jnp.max(b) * 5], [a, b], "x", op="max")
        return total, biggest

    mapped = jax.shard_map(
        body, mesh=mesh, in_specs=(jax.P("x"), jax.P()), out_specs=(jax.P(), jax.P())
    )
    total, biggest = jax.jit(mapped)(sharded, replicated)
    assert float(total) == 11.0  # 8 sharded ones, 3 replicated ones counted once
    assert float(biggest) == 5.0
