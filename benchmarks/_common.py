"""What the benchmark scripts share: the description of the machine and the tree shapes."""

from __future__ import annotations

import datetime
import math
import os
import platform
from typing import Any

import jax
import optax

import gradsafe as gs


def environment() -> dict[str, Any]:
    """The date, versions, backend and machine of a run (stored with every result)."""
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "gradsafe": gs.__version__,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        # settings that change the timings: XLA's flags, and glibc's allocator (on CPU a step's
        # temporary buffers beyond its mmap threshold, at most 32 MiB by default, are mapped
        # and page-faulted afresh on every call)
        "env": {k: v for k, v in os.environ.items() if k == "XLA_FLAGS" or k.startswith("MALLOC_")},
    }


def command_line(script: str, env: dict[str, Any], argv: list[str]) -> str:
    """The command that produced a run: the environment settings it recorded, then
    ``python benchmarks/<script> <argv>``."""
    settings = [f"{key}={value}" for key, value in env.get("env", {}).items()]
    return " ".join([*settings, f"python benchmarks/{script}", *argv])


def leaf_shape(elements: int) -> tuple[int, ...]:
    """A square matrix when ``elements`` is a perfect square (a dense kernel), else a vector."""
    side = math.isqrt(elements)
    return (side, side) if side * side == elements else (elements,)
