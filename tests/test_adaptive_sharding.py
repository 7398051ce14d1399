"""The adaptive clippers inside ``shard_map`` on 8 devices: the single-device result, and
every device takes the same decision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from adaptive_cases import FACTORIES, assert_trees_close, run_jitted, sequence
from jax.sharding import PartitionSpec as P

import gradsafe as gs

# --------------------------------------------------------------------------------------------
# shard_map on 8 devices
# --------------------------------------------------------------------------------------------


def _mesh():
    return jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


def _state_specs(state):
    """Replicated scalars; spike_clip's nu is sharded like the gradient."""
    specs = jax.tree.map(lambda _: P(), state)
    if isinstance(state, gs.SpikeClipState):
        specs = specs._replace(nu={"a": P("d"), "b": P()})
    return specs


@pytest.mark.parametrize(
    "name", ["zclip", "autoclip_p2", "autoclip_window", "adagc_leaf", "adagc_global", "spike_clip"]
)
def test_shard_map_gives_the_single_device_result(name):
    """Leaf ``a`` sharded over 8 devices, ``b`` replicated (counted once in the norm); the
    replicated state outputs (``out_specs=P()``) are checked invariant by shard_map."""
    make = FACTORIES[name]
    grads = sequence(26)
    single_outs, single_states = run_jitted(make(), grads)

    mesh = _mesh()
    tx = make()
    state = tx.init(grads[0])
    grad_specs = {"a": P("d"), "b": P()}
    state_specs = _state_specs(state)
    tx_sharded = make("d")
    step = jax.jit(
        jax.shard_map(
            tx_sharded.update,
            mesh=mesh,
            in_specs=(grad_specs, state_specs),
            out_specs=(grad_specs, state_specs),
        )
    )
    put = lambda tree, specs: jax.tree.map(
        lambda x, s: jax.device_put(x, jax.NamedSharding(mesh, s)), tree, specs
    )
    state = put(tx_sharded.init(grads[0]), state_specs)
    for t, g in enumerate(grads):
        out, state = step(put(g, grad_specs), state)
        assert_trees_close(out, single_outs[t], rtol=2e-5, atol=1e-7)
        assert bool(state.clipped) == bool(single_states[t].clipped), t
    assert_trees_close(state, single_states[-1], rtol=2e-5, atol=1e-7)


def test_shard_map_every_device_takes_the_same_decision():
    """Without replication tracking (check_vma=False), gather each device's view of the
    decision: all 8 devices report the same norm, threshold and clip flag."""
    mesh = _mesh()
    grads = sequence(26, shape_a=(16, 3))
    grads = [{"a": g["a"], "b": jnp.tile(g["b"], 8)} for g in grads]  # everything sharded
    for make in (
        lambda a: gs.zclip(warmup_steps=5, max_norm=None, z_thresh=2.0, axis_name=a),
        lambda a: gs.autoclip(25.0, axis_name=a),
        lambda a: gs.adagc(warmup_steps=5, scope="global", axis_name=a),
    ):
        single_outs, single_states = run_jitted(make(None), grads)
        tx = make("d")
        state = tx.init(grads[0])

        def local(g, state, tx=tx):
            out, state = tx.update(g, state)
            views = jnp.stack([state.norm, state.threshold, state.clipped.astype(jnp.float32)])[
                None
            ]
            return out, state, views

        specs = {"a": P("d"), "b": P("d")}
        step = jax.jit(
            jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(specs, P()),
                out_specs=(specs, P(), P("d")),
                check_vma=False,
            )
        )
        for t, g in enumerate(grads):
            out, state, views = step(g, state)
            views = np.asarray(views)
            assert (views == views[0]).all(), (t, views)
            np.testing.assert_allclose(views[0, 0], single_states[t].norm, rtol=1e-5)
            assert bool(views[0, 2]) == bool(single_states[t].clipped)
            assert_trees_close(out, single_outs[t], rtol=2e-5, atol=1e-7)
