"""Two processes joined by ``jax.distributed`` give the single-process numbers.

Two worker processes (tests/multiprocess_worker.py) on this machine join through a coordinator
on a loopback port, with CPU collectives (gloo) and two CPU devices each; a mesh spans the four
devices of both processes, every leaf of the params and gradients is split across them, and
``clip_by_global_norm``, ``zclip`` and ``stabilize(adam)`` are trained for a few steps with a
gradient spike. Their updates, params and logged figures must equal those of one process that
holds the same global arrays unsharded. This is the layout of a multi-host run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import multiprocess_worker as worker
import numpy as np
import pytest

PROCESSES = 2
LOCAL_DEVICES = 2
TIMEOUT_S = 150  # both workers together; they take about 35 s on two busy cores
ROOT = Path(__file__).resolve().parent.parent


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(out: Path) -> list[subprocess.Popen]:
    """Start the workers."""
    port = _free_loopback_port()
    env = dict(os.environ)
    # The gradsafe under test (this checkout), one CPU platform, no inherited device count.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    script = str(Path(worker.__file__).resolve())
    procs = [
        subprocess.Popen(
            [sys.executable, script, *map(str, (port, i, PROCESSES, LOCAL_DEVICES, out))],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(PROCESSES)
    ]
    return procs


def _wait(procs: list[subprocess.Popen]) -> None:
    """Wait for the workers to finish, or fail with what they printed."""
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        tails = [(proc.communicate()[0] or "")[-3000:] for proc in procs]
        pytest.fail(f"workers did not finish in {TIMEOUT_S} s; their output:\n" + "\n".join(tails))
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        details = "\n".join(f"--- process {i} (exit {rc}):\n{logs[i][-4000:]}" for i, rc in failed)
        pytest.fail(f"multi-process workers failed:\n{details}")


def _single_process() -> dict[str, np.ndarray]:
    device = jax.devices()[0]
    results = {}
    # Optax's Adam mixes Python floats with int32 counts, which the suite's strict promotion
    # refuses; the workers run with JAX's default (standard) promotion too.
    with jax.numpy_dtype_promotion("standard"):
        for name in worker.transforms():
            put = lambda array, stepped: jax.device_put(jnp.asarray(array), device)
            try:
                for key, value in worker.run(name, put).items():
                    results[f"{name}/{key}"] = value
            except Exception as error:
                results[f"{name}/error"] = np.array(worker.describe(error))
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(two-process results, single-process results); the reference runs while workers do."""
    out = tmp_path_factory.mktemp("multiprocess") / "results.npz"
    procs = _launch(out)
    try:
        single = _single_process()
    finally:
        _wait(procs)
    assert out.exists(), "process 0 finished without writing its results"
    with np.load(out) as data:
        return dict(data), single


def test_the_workers_span_two_processes(results):
    distributed_results, _ = results
    assert int(distributed_results["devices"]) == PROCESSES * LOCAL_DEVICES


@pytest.mark.parametrize("name", sorted(worker.transforms()))
def test_sharded_across_processes_matches_single_process(name, results):
    distributed_results, single_process_results = results
    for where, found in (("one", single_process_results), ("two", distributed_results)):
        if f"{name}/error" in found:
            pytest.fail(f"{name} failed in the {where}-process run: {found[f'{name}/error']}")
    keys = sorted(k for k in single_process_results if k.startswith(f"{name}/"))
    assert keys == sorted(k for k in distributed_results if k.startswith(f"{name}/"))
    for key in keys:
        expected, actual = single_process_results[key], distributed_results[key]
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, key
        # Sums over shards are added in another order: float32 rounding, nothing more.
        np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=1e-6, err_msg=key)
    # The spike was clipped, so the comparison covers the clipping path, not only the identity.
    clipped = [k for k in keys if k.endswith(("zclip/clipped", "clip_by_global_norm/clipped"))]
    assert clipped, keys
    for key in clipped:
        assert bool(single_process_results[key][worker.SPIKE_STEP]), key
