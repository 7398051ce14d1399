"""Which ``split_clip`` settings: the stability suite's tasks with its variants, more seeds.

``gs.split_clip`` carries what a clip removed and pays it back later. How much to carry, how
fast to forget it and when to release it decide whether that helps or replays the explosion
the clip removed. This script trains the tasks of ``benchmarks/stability.py`` (the same
models, data, grids and reports) with ``gs.clip_by_global_norm(1.0)`` and the ``split_clip``
variants of ``VARIANTS`` (the default, and each of its choices undone or changed), with 6
seeds per learning rate by default (twice the suite's: the divergence counts at the largest
learning rates move by a run or two between seeds)::

    python benchmarks/split_clip_variants.py            # ~10 minutes on 2 CPU cores
    python benchmarks/split_clip_variants.py --tasks adding_irnn --seeds 3

Results: ``benchmarks/results/split_clip_variants/`` (``stability.json``, ``.md`` and plots,
as the suite writes them).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import optax

import gradsafe as gs

# The scripts run as files and are loaded by path in the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import stability

# name -> the clipper put in front of each task's optimizer
VARIANTS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "gs.clip_by_global_norm(1.0)": lambda: gs.clip_by_global_norm(1.0),
    "split_clip(max_residual_ratio=1.0, clip_rate_decay=None, explosion_ratio=None)": (
        lambda: gs.split_clip(max_residual_ratio=1.0, clip_rate_decay=None, explosion_ratio=None)
    ),
    "split_clip(clip_rate_decay=None)": lambda: gs.split_clip(clip_rate_decay=None),
    "split_clip() (max_residual_ratio=0.25, clip_rate_decay=0.98, explosion_ratio=2.0)": (
        lambda: gs.split_clip()
    ),
    "split_clip(explosion_ratio=None)": lambda: gs.split_clip(explosion_ratio=None),
    "split_clip(explosion_ratio=4.0)": lambda: gs.split_clip(explosion_ratio=4.0),
    "split_clip(clip_rate_decay=0.9)": lambda: gs.split_clip(clip_rate_decay=0.9),
    "split_clip(max_residual_ratio=1.0)": lambda: gs.split_clip(max_residual_ratio=1.0),
    "split_clip(residual_decay=0.5, max_residual_ratio=0.5, clip_rate_decay=None)": (
        lambda: gs.split_clip(residual_decay=0.5, max_residual_ratio=0.5, clip_rate_decay=None)
    ),
    "split_clip(gs.zclip())": lambda: gs.split_clip(gs.zclip()),
    "split_clip(release='always', residual_decay=0.5, max_residual_ratio=0.5)": (
        lambda: gs.split_clip(release="always", residual_decay=0.5, max_residual_ratio=0.5)
    ),
}
TASKS = ("adding_rnn", "adding_irnn", "transformer", "spiky_regression", "deep_mlp")


def main(argv: list[str] | None = None) -> int:
    return stability.run_variants(
        {name: stability._before(make) for name, make in VARIANTS.items()},
        argv,
        description=__doc__.split("\n")[0],
        tasks=TASKS,
        out=Path(__file__).resolve().parent / "results" / "split_clip_variants",
    )


if __name__ == "__main__":
    sys.exit(main())
