"""The adaptive clippers inside ``shard_map`` on 8 devices: the single-device result, and
every device takes the same decision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import gradsafe as gs

F32 = np.float32

# Every adaptive clipper, with settings short enough that warm-ups end inside the tests.
FACTORIES = {
    "zclip": lambda axis=None: gs.zclip(warmup_steps=5, axis_name=axis),
    "zclip_uncapped": lambda axis=None: gs.zclip(
        warmup_steps=5, max_norm=None, z_thresh=2.0, axis_name=axis
    ),
    "zclip_percentile": lambda axis=None: gs.zclip(
        warmup_steps=5, mode="percentile", max_norm=None, axis_name=axis
    ),
    "autoclip_p2": lambda axis=None: gs.autoclip(25.0, axis_name=axis),
    "autoclip_window": lambda axis=None: gs.autoclip(25.0, window=8, axis_name=axis),
    "adagc_leaf": lambda axis=None: gs.adagc(warmup_steps=5, axis_name=axis),
    "adagc_global": lambda axis=None: gs.adagc(warmup_steps=5, scope="global", axis_name=axis),
    "spike_clip": lambda axis=None: gs.spike_clip(
        threshold=20.0, beta2=0.9, warmup_steps=3, axis_name=axis
    ),
}


def sequence(steps=30, seed=0, shape_a=(16, 3)):
    rng = np.random.default_rng(seed)
    grads = []
    for t in range(steps):
        a = rng.normal(size=shape_a).astype(F32) * F32(0.2)
        b = rng.normal(size=(5,)).astype(F32) * F32(0.3)
        if t in (12, 20):
            a, b = a * F32(30), b * F32(30)
        if t == 17:
            b = b * F32(25)
        if t == 24:
            a = a.copy()
            a[1, 1] = F32(90.0)
        grads.append({"a": jnp.asarray(a), "b": jnp.asarray(b)})
    return grads


def run_jitted(tx, grads, state=None):
    state = tx.init(grads[0]) if state is None else state
    update = jax.jit(tx.update)
    outs, states = [], []
    for g in grads:
        out, state = update(g, state)
        outs.append(out)
        states.append(state)
    return outs, states


def assert_trees_close(x, y, rtol=1e-6, atol=1e-7):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol),
        x,
        y,
    )


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
