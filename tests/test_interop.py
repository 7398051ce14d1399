"""The fixed clippers with Optax combinators and Flax: chain, inject_hyperparams, MultiSteps,
partition, nnx.Optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gradsafe as gs

# Optax's optimizers (Adam's bias correction, schedules) are not clean under the suite's strict
# dtype promotion; interop runs use standard promotion, as users do.
pytestmark = pytest.mark.usefixtures("standard_promotion")


@pytest.fixture
def standard_promotion():
    with jax.numpy_dtype_promotion("standard"):
        yield


PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
GRADS = {"w": jnp.full((3, 2), 10.0), "b": jnp.array([3.0, -4.0])}

# name -> (factory taking the threshold by keyword, threshold keyword)
CLIPPERS = {
    "clip_by_value": (gs.clip_by_value, "max_delta"),
    "clip_by_global_norm": (gs.clip_by_global_norm, "max_norm"),
    "clip_by_leaf_norm": (gs.clip_by_leaf_norm, "max_norm"),
    "clip_by_block_rms": (gs.clip_by_block_rms, "threshold"),
    "adaptive_grad_clip": (gs.adaptive_grad_clip, "clipping"),
}


def updates_of(tx, grads=GRADS, params=PARAMS, steps=1, **extra):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(steps):
        updates, state = update(grads, state, params, **extra)
    return updates, state


@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_chain_with_adam_and_extra_args(name):
    factory, key = CLIPPERS[name]
    tx = optax.chain(factory(**{key: 0.5}), optax.adam(1e-2))
    updates, _ = updates_of(tx, value=jnp.array(1.0), unused=3)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_alone_accepts_unknown_extra_args(name):
    factory, key = CLIPPERS[name]
    plain, _ = updates_of(factory(**{key: 0.5}))
    extra, _ = updates_of(factory(**{key: 0.5}), value=jnp.array(2.0), step=jnp.array(3))
    jax.tree.map(np.testing.assert_array_equal, plain, extra)


@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_inject_hyperparams_equals_plain(name):
    factory, key = CLIPPERS[name]
    plain, _ = updates_of(factory(**{key: 0.5}))
    injected, state = updates_of(optax.inject_hyperparams(factory)(**{key: 0.5}))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), plain, injected)
    assert float(state.hyperparams[key]) == 0.5


@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_inject_hyperparams_with_schedule_and_bf16_grads(name):
    """f32 params make the injected threshold f32; bf16 grads must still work (Optax raises)."""
    factory, key = CLIPPERS[name]
    schedule = optax.linear_schedule(1.0, 0.1, transition_steps=4)
    tx = optax.inject_hyperparams(factory)(**{key: schedule})
    grads = jax.tree.map(lambda g: g.astype(jnp.bfloat16), GRADS)
    updates, state = updates_of(tx, grads=grads, steps=3)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert float(state.hyperparams[key]) == pytest.approx(1.0 - 0.9 * 2 / 4)


def test_inject_hyperparams_traces_norm_type():
    """inject_hyperparams turns a defaulted norm_type into a traced value; it must still work."""
    tx = optax.inject_hyperparams(gs.clip_by_global_norm)(max_norm=1.0, norm_type=1)
    _, state = updates_of(tx, grads={"a": jnp.array([3.0, -4.0])}, params={"a": jnp.zeros(2)})
    assert float(gs.metrics(state)["clip_by_global_norm/norm"]) == 7.0
    tx = optax.inject_hyperparams(gs.clip_by_global_norm)(max_norm=1.0)  # default 2, traced
    _, state = updates_of(tx, grads={"a": jnp.array([3.0, -4.0])}, params={"a": jnp.zeros(2)})
    assert float(gs.metrics(state)["clip_by_global_norm/norm"]) == 5.0
    tx = optax.inject_hyperparams(gs.clip_by_global_norm)(max_norm=1.0, norm_type=np.inf)
    _, state = updates_of(tx, grads={"a": jnp.array([3.0, -4.0])}, params={"a": jnp.zeros(2)})
    assert float(gs.metrics(state)["clip_by_global_norm/norm"]) == 4.0


def test_inject_hyperparams_agc_exclude_is_static():
    def exclude(params):
        return {"w": False, "b": True}

    tx = optax.inject_hyperparams(gs.adaptive_grad_clip, static_args=("exclude",))(
        clipping=0.01, exclude=exclude
    )
    updates, _ = updates_of(tx)
    np.testing.assert_array_equal(updates["b"], GRADS["b"])


def test_multisteps_averages_then_clips():
    tx = optax.MultiSteps(gs.clip_by_global_norm(1.0), every_k_schedule=2)
    state = tx.init(PARAMS)
    first, state = tx.update(GRADS, state, PARAMS)
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(first))
    second, state = tx.update(GRADS, state, PARAMS)
    assert float(gs.global_norm(second)) == pytest.approx(1.0, rel=1e-6)
    assert int(gs.metrics(state)["clip_by_global_norm/count"]) == 1


def test_partition_clips_each_group_by_its_own_norm():
    tx = optax.partition(
        {"big": gs.clip_by_global_norm(1.0), "small": gs.clip_by_global_norm(10.0)},
        {"w": "big", "b": "small"},
    )
    updates, _ = updates_of(tx)
    assert float(jnp.linalg.norm(updates["w"])) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_array_equal(updates["b"], GRADS["b"])  # norm 5 <= 10


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(3, 8, rngs=rngs)
        self.out = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


@pytest.mark.parametrize("in_chain", [False, True])
@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_nnx_optimizer_update_with_value(name, in_chain):
    factory, key = CLIPPERS[name]
    clipper = factory(**{key: 0.1})
    tx = optax.chain(clipper, optax.sgd(0.1)) if in_chain else clipper
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y = jnp.ones((4, 3)), jnp.full((4, 1), 5.0)

    @nnx.jit
    def train_step(model, optimizer):
        def loss_fn(m):
            return jnp.mean((m(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads, value=loss)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(3)]
    assert all(np.isfinite(losses))
    assert int(gs.metrics(optimizer.opt_state)[f"{name}/count"]) == 3
