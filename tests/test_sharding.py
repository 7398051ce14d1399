"""Fixed clippers on 8 devices: shard_map with axis_name, pmap, and jit with NamedSharding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gradsafe as gs

MESH = jax.make_mesh((8,), ("x",))

# A model-sharded kernel (rows split over "x") and a replicated bias.
GRADS = {
    "kernel": jnp.arange(32.0).reshape(16, 2) / 7 - 2,
    "bias": jnp.array([3.0, -4.0, 0.5]),
}
SPECS = {"kernel": P("x"), "bias": P()}


def put(tree, specs):
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(MESH, s)), tree, specs)


def sharded_update(tx, grads=GRADS, specs=SPECS, check_vma=True):
    def body(g):
        out, state = tx.update(g, tx.init(g))
        return out, state

    state_specs = jax.tree.map(lambda _: P(), jax.eval_shape(tx.init, grads))
    mapped = jax.shard_map(
        body, mesh=MESH, in_specs=(specs,), out_specs=(specs, state_specs), check_vma=check_vma
    )
    return jax.jit(mapped)(put(grads, specs))


@pytest.mark.parametrize("norm_type", [1, 2, "inf"])
@pytest.mark.parametrize("semantics", ["optax", "torch"])
def test_global_norm_shard_map_equals_single_device(norm_type, semantics):
    make = lambda axis_name: gs.clip_by_global_norm(
        1.0, norm_type=norm_type, semantics=semantics, axis_name=axis_name
    )
    expected, expected_state = make(None).update(GRADS, make(None).init(GRADS))
    out, state = sharded_update(make("x"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out, expected)
    np.testing.assert_allclose(state.norm, expected_state.norm, rtol=1e-6)
    np.testing.assert_allclose(state.scale, expected_state.scale, rtol=1e-6)


def test_without_axis_name_shard_map_uses_local_norms():
    """The failure axis_name fixes: per-shard norms clip every shard separately."""
    out, _ = sharded_update(gs.clip_by_global_norm(1.0), check_vma=False)
    assert float(gs.global_norm(out)) > 1.2  # 1.0 with axis_name="x"


def test_leaf_norm_shard_map_equals_single_device():
    tx = gs.clip_by_leaf_norm(1.0, axis_name="x")
    expected, _ = gs.clip_by_leaf_norm(1.0).update(GRADS, gs.clip_by_leaf_norm(1.0).init(GRADS))
    out, _ = sharded_update(tx)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out, expected)


def test_shard_map_two_axes_and_partial_replication():
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    grads = {"w": jnp.arange(16.0).reshape(8, 2) - 3, "v": jnp.arange(4.0)}
    specs = {"w": P("data", "model"), "v": P("data")}  # v is replicated along "model"
    tx = gs.clip_by_global_norm(2.0, axis_name=("data", "model"))
    expected, _ = gs.clip_by_global_norm(2.0).update(grads, tx.init(grads))

    def body(g):
        return tx.update(g, tx.init(g))[0]

    placed = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), grads, specs)
    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(specs,), out_specs=specs))(placed)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out, expected)


def test_every_device_takes_the_same_decision():
    tx = gs.clip_by_global_norm(1.0, axis_name="x")

    def body(g):
        _, state = tx.update(g, tx.init(g))
        return state.scale[None], state.clipped[None]

    grads = {"kernel": GRADS["kernel"]}
    mapped = jax.shard_map(body, mesh=MESH, in_specs=({"kernel": P("x")},), out_specs=P("x"))
    scales, clipped = jax.jit(mapped)(put(grads, {"kernel": P("x")}))
    assert np.unique(np.asarray(scales)).size == 1
    assert np.all(np.asarray(clipped))


def test_pmap_with_axis_name_sums_every_shard():
    shards = jnp.arange(16.0).reshape(8, 2)
    tx = gs.clip_by_global_norm(1.0, axis_name="i")
    out = jax.pmap(lambda g: tx.update(g, tx.init(g))[0], axis_name="i")(shards)
    np.testing.assert_allclose(float(jnp.linalg.norm(out)), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "spec,shape", [(P("x"), (8,)), (P("x", None), (8, 4)), (P(None, "x"), (4, 8))]
)
def test_agc_under_explicit_sharding(spec, shape):
    """Optax raises ShardingTypeError for the first two; gradsafe works and matches it."""
    explicit = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    size = int(np.prod(shape))
    params = jnp.linspace(0.1, 1.0, size).reshape(shape)
    grads = jnp.linspace(-5.0, 5.0, size).reshape(shape)
    tx = gs.adaptive_grad_clip(0.05)
    expected, _ = jax.jit(optax.adaptive_grad_clip(0.05).update)(grads, optax.EmptyState(), params)
    with jax.set_mesh(explicit):
        p = jax.device_put(params, NamedSharding(explicit, spec))
        g = jax.device_put(grads, NamedSharding(explicit, spec))
        out, _ = jax.jit(tx.update)(g, tx.init(p), p)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out.sharding.spec == NamedSharding(explicit, spec).spec


@pytest.mark.parametrize(
    "tx",
    [
        gs.clip_by_value(0.5),
        gs.clip_by_global_norm(1.0),
        gs.clip_by_leaf_norm(1.0),
        gs.clip_by_block_rms(0.1),
    ],
    ids=["value", "global_norm", "leaf_norm", "block_rms"],
)
def test_jit_with_named_sharding_is_global_and_keeps_sharding(tx):
    expected, _ = tx.update(GRADS, tx.init(GRADS))
    placed = put(GRADS, SPECS)
    out, _ = jax.jit(tx.update)(placed, tx.init(placed))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out, expected)
    assert out["kernel"].sharding.is_equivalent_to(placed["kernel"].sharding, 2)


# --------------------------------------------------------------------------------------------
# NaN on one shard, overflow on one shard, explicit-sharding buffers (issue 12)
# --------------------------------------------------------------------------------------------


def _local_norm(grads, norm_type, specs=SPECS):
    mapped = jax.shard_map(
        lambda g: gs.global_norm(g, norm_type, axis_name="x"),
        mesh=MESH,
        in_specs=(specs,),
        out_specs=P(),
    )
    return jax.jit(mapped)(put(grads, specs))


@pytest.mark.parametrize("norm_type", [1, 2, "inf"])
def test_nan_on_one_shard_gives_nan_like_one_device(norm_type):
    grads = {"kernel": GRADS["kernel"].at[5, 1].set(jnp.nan), "bias": GRADS["bias"]}
    assert np.isnan(float(gs.global_norm(grads, norm_type)))
    assert np.isnan(float(_local_norm(grads, norm_type)))


def test_overflow_on_one_shard_is_rescaled_across_devices():
    grads = {"kernel": GRADS["kernel"].at[3, 0].set(1e20), "bias": GRADS["bias"]}
    expected = float(gs.global_norm(grads))
    np.testing.assert_allclose(expected, 1e20, rtol=1e-6)
    np.testing.assert_allclose(float(_local_norm(grads, 2)), expected, rtol=1e-6)
    out, state = sharded_update(gs.clip_by_global_norm(1.0, axis_name="x"), grads)
    assert float(gs.global_norm(out)) <= 1.0 + 1e-6
    np.testing.assert_allclose(float(state.norm), expected, rtol=1e-6)


def test_spike_clip_buffers_follow_explicit_sharding():
    explicit = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    tx = gs.spike_clip(threshold=4.0, beta2=0.5, warmup_steps=2)
    grads = jnp.linspace(-1.0, 1.0, 16).reshape(8, 2)
    _, expected_state = tx.update(grads, tx.init(grads))
    with jax.set_mesh(explicit):
        g = jax.device_put(grads, NamedSharding(explicit, P("x")))
        state = jax.jit(tx.init)(g)
        assert state.nu.sharding.is_equivalent_to(g.sharding, 2)
        out, state = jax.jit(tx.update)(g, state)
        out, state = jax.jit(tx.update)(g * 100, state)
    reference_out, _ = tx.update(grads * 100, expected_state)
    np.testing.assert_allclose(out, reference_out, rtol=1e-6)
    assert state.nu.sharding.is_equivalent_to(g.sharding, 2)
