"""metrics(), leaf_norms() and largest_leaves()."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gradsafe as gs

PARAMS = {"w": jnp.zeros(2), "b": jnp.zeros(1)}
GRADS = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([0.0])}


# Optax's own optimizers (e.g. Adam's bias correction) are not clean under the suite's strict
# dtype promotion, so calls that run them use standard promotion.
standard_promotion = jax.numpy_dtype_promotion("standard")


def step(tx, grads=GRADS, params=PARAMS, **extra):
    with standard_promotion:
        state = tx.init(params)
        return jax.jit(tx.update)(grads, state, params, **extra)[1]


def test_chain_keys_and_values():
    state = step(optax.chain(gs.clip_by_global_norm(1.0), optax.adam(1e-3)))
    found = gs.metrics(state)
    assert set(found) == {
        "clip_by_global_norm/norm",
        "clip_by_global_norm/scale",
        "clip_by_global_norm/threshold",
        "clip_by_global_norm/clipped",
        "clip_by_global_norm/count",
    }
    assert float(found["clip_by_global_norm/norm"]) == 5.0
    assert float(found["clip_by_global_norm/scale"]) == pytest.approx(0.2)
    assert bool(found["clip_by_global_norm/clipped"])
    assert int(found["clip_by_global_norm/count"]) == 1


def test_duplicates_get_unique_names_in_tree_order():
    tx = optax.chain(
        gs.clip_by_global_norm(10.0), gs.clip_by_value(1.0), gs.clip_by_global_norm(1.0)
    )
    found = gs.metrics(step(tx))
    assert float(found["clip_by_global_norm/norm"]) == 5.0
    assert float(found["clip_by_global_norm/threshold"]) == 10.0
    assert float(found["clip_by_global_norm_1/threshold"]) == 1.0
    assert float(found["clip_by_global_norm_1/norm"]) == pytest.approx(np.sqrt(2.0))
    assert "clip_by_value/clipped" in found


def test_found_inside_partition_masked_inject_and_multisteps():
    labels = {"w": "clip", "b": "none"}
    partition = optax.partition(
        {"clip": gs.clip_by_global_norm(1.0), "none": optax.identity()}, labels
    )
    masked = optax.masked(gs.clip_by_leaf_norm(1.0), {"w": True, "b": False})
    injected = optax.inject_hyperparams(gs.clip_by_block_rms)(threshold=0.5)
    multi = optax.MultiSteps(gs.clip_by_value(0.1), every_k_schedule=1)
    tx = optax.chain(partition, masked, injected, multi.gradient_transformation())
    found = gs.metrics(step(tx))
    for name in ("clip_by_global_norm", "clip_by_leaf_norm", "clip_by_block_rms", "clip_by_value"):
        assert f"{name}/count" in found, name
    assert float(found["clip_by_global_norm/norm"]) == 5.0  # only "w" is in the group
    assert float(found["clip_by_block_rms/threshold"]) == 0.5


def test_callable_inside_jit():
    tx = optax.chain(gs.clip_by_global_norm(1.0), optax.sgd(0.1))

    @jax.jit
    def train_step(params, state):
        updates, state = tx.update(GRADS, state, params)
        return optax.apply_updates(params, updates), state, gs.metrics(state)

    with standard_promotion:
        _, _, found = train_step(PARAMS, tx.init(PARAMS))
    assert float(found["clip_by_global_norm/norm"]) == 5.0


def test_nnx_optimizer_state():
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    tx = optax.chain(gs.clip_by_global_norm(1e-3), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(m):
        return jnp.mean((m(jnp.ones((4, 2))) - 10.0) ** 2)

    with standard_promotion:
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads, value=loss)
    found = gs.metrics(optimizer.opt_state)
    assert int(found["clip_by_global_norm/count"]) == 1
    assert bool(found["clip_by_global_norm/clipped"])
    assert float(found["clip_by_global_norm/norm"]) > 1e-3


def test_no_gradsafe_state_gives_empty_dict():
    assert gs.metrics(optax.adam(1e-3).init(PARAMS)) == {}
    assert gs.metrics(None) == {}
    assert gs.metrics(()) == {}


def test_leaf_norms():
    tree = {
        "a": jnp.array([3.0, 4.0]),
        "i": jnp.array([7]),
        "n": None,
        "h": jnp.ones(4, jnp.float16),
    }
    norms = gs.leaf_norms(tree)
    assert float(norms["a"]) == 5.0
    assert norms["i"] is None and norms["n"] is None
    assert float(norms["h"]) == 2.0 and norms["h"].dtype == jnp.float32
    assert float(gs.leaf_norms(tree, norm_type="inf")["a"]) == 4.0


def test_largest_leaves_finds_the_exploding_layer():
    grads = {
        "encoder": {"layer_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}},
        "decoder": [{"kernel": jnp.full((2, 2), 1e4)}, {"kernel": jnp.array([jnp.nan])}],
        "step": jnp.array(3),
    }
    top = gs.largest_leaves(grads, k=3)
    assert [path for path, _ in top] == [
        "decoder/1/kernel",
        "decoder/0/kernel",
        "encoder/layer_0/kernel",
    ]
    assert np.isnan(top[0][1])
    assert top[1][1] == pytest.approx(2e4)
    assert len(gs.largest_leaves(grads, k=100)) == 4
    assert gs.largest_leaves({}, k=2) == []


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_largest_leaves_bad_k(k):
    with pytest.raises(ValueError, match="k"):
        gs.largest_leaves(GRADS, k=k)
