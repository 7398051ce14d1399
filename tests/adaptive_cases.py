"""Shared cases for the adaptive-clipper tests: the factories, a gradient sequence with planted
spikes, and helpers to run and compare."""

import jax
import jax.numpy as jnp
import numpy as np

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


def run_steps(tx, grads, state=None, *, jit=True):
    """Outputs and states of ``tx.update`` (jitted unless ``jit=False``) over ``grads``."""
    state = tx.init(grads[0]) if state is None else state
    update = jax.jit(tx.update) if jit else tx.update
    outs, states = [], []
    for g in grads:
        out, state = update(g, state)
        outs.append(out)
        states.append(state)
    return outs, states


def run_jitted(tx, grads, state=None):
    """``run_steps`` with the update jitted."""
    return run_steps(tx, grads, state)


def assert_trees_close(x, y, rtol=1e-6, atol=1e-7):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol),
        x,
        y,
    )
