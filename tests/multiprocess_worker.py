"""One process of the two-process test in tests/test_multiprocess.py (also its reference run).

Run as ``python tests/multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES LOCAL_DEVICES OUT``:
the process joins ``jax.distributed`` on ``127.0.0.1:PORT`` with CPU collectives (gloo), builds
a mesh over the devices of every process, trains each transform of :data:`TRANSFORMS` for
:data:`STEPS` steps on a tree whose leaves are sharded across the processes, gathers the
updates, params and norms, and process 0 writes them to ``OUT`` (an ``.npz`` file).
:func:`run` is also imported by the test to compute the same numbers in one process, unsharded.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

STEPS = 6
SPIKE_STEP = 4  # a gradient 100x larger than the others: zclip and stabilize must react
SHAPES = {"kernel": (8, 6), "bias": (8,), "scale": (8, 3)}


def transforms() -> dict[str, Callable[[], Any]]:
    """The transforms compared, built fresh (after jax is configured)."""
    import optax

    import gradsafe as gs

    return {
        "clip_by_global_norm": lambda: gs.clip_by_global_norm(1.0),
        "zclip": lambda: gs.zclip(warmup_steps=3),
        "stabilize": lambda: gs.stabilize(optax.adam(1e-2), clip=gs.zclip(warmup_steps=3)),
    }


def global_arrays() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], np.ndarray]:
    """The params, each step's gradient and each step's loss, as float32 NumPy arrays."""
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    grads = []
    for step in range(STEPS):
        factor = 100.0 if step == SPIKE_STEP else 1.0 + 0.1 * step
        grads.append(
            {k: (rng.normal(size=s) * factor).astype(np.float32) for k, s in SHAPES.items()}
        )
    losses = np.array([10.0 if s == SPIKE_STEP else 1.0 for s in range(STEPS)], np.float32)
    return params, grads, losses


def run(name: str, put: Callable[[np.ndarray, bool], Any]) -> dict[str, np.ndarray]:
    """Train transform ``name`` for STEPS steps (one ``lax.scan`` under ``jit``).

    ``put(array, stepped)`` turns a NumPy array into a jax array (``stepped``: its leading axis
    is the step). Returns every step's updates and params (keyed ``updates/<leaf>`` and
    ``params/<leaf>``) and :func:`gradsafe.metrics` figures (``metrics/<name>``), stacked along
    a leading step axis.
    """
    import jax
    import optax

    import gradsafe as gs

    tx = transforms()[name]()
    params_np, grads_np, losses_np = global_arrays()
    params = {k: put(v, False) for k, v in params_np.items()}
    grads = {k: put(np.stack([g[k] for g in grads_np]), True) for k in params_np}
    losses = put(losses_np, True)

    def step(carry, batch):
        params, state = carry
        updates, state = tx.update(batch[0], state, params, value=batch[1])
        params = optax.apply_updates(params, updates)
        figures = {f"metrics/{k}": v for k, v in gs.metrics(state).items()}
        figures |= {f"updates/{k}": v for k, v in updates.items()}
        figures |= {f"params/{k}": v for k, v in params.items()}
        return (params, state), figures

    def train(params, grads, losses):
        return jax.lax.scan(step, (params, tx.init(params)), (grads, losses))[1]

    # Compiling dominates; XLA's cheapest backend level compiles several times faster.
    train = jax.jit(train, compiler_options={"xla_backend_optimization_level": 0})

    return {key: gather(value) for key, value in train(params, grads, losses).items()}


def describe(error: Exception) -> str:
    """One transform's failure, reported by the test for that transform only."""
    return f"{type(error).__name__}: {error}"[:4000]


def gather(value: Any) -> np.ndarray:
    """The whole (global) value of ``value`` on this host, even when sharded across processes."""
    import jax
    from jax.experimental import multihost_utils

    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(value)


def main(port: int, process_id: int, num_processes: int, local_devices: int, out: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_platforms", "cpu")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    assert jax.process_count() == num_processes, jax.process_count()
    assert len(jax.local_devices()) == local_devices, jax.local_devices()
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("x",), devices=devices)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def put(array: np.ndarray, stepped: bool) -> jax.Array:
        """``array`` laid out over every process: rows split along the mesh (after the step
        axis, if any); per-step scalars replicated."""
        spec = jax.sharding.PartitionSpec(*([None] * stepped), "x")
        target = jax.sharding.NamedSharding(mesh, spec) if array.ndim > stepped else replicated
        return jax.make_array_from_callback(array.shape, target, lambda index: array[index])

    results: dict[str, np.ndarray] = {}
    with jax.set_mesh(mesh):
        for name in transforms():
            # Each process holds only its own rows of every leaf: the layout of a multi-host run.
            try:
                for key, value in run(name, put).items():
                    results[f"{name}/{key}"] = value
            except Exception as error:  # both processes fail alike (at trace time)
                results[f"{name}/error"] = np.array(describe(error))
    results["devices"] = np.array(len(devices))
    if process_id == 0:
        np.savez(out, **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
