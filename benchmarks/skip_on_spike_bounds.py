"""How many refusals in a row before ``skip_on_spike`` accepts a new level: the suite's tasks.

``gs.skip_on_spike`` refuses a step whose loss or gradient norm spikes; after
``max_consecutive_skips`` refusals in a row it takes the spike as a new level, accepts it and
re-bases its statistics. A refusal cannot undo the step that raised the loss, so a long bound
holds the parameters where a bad step left them; a short one lets a burst of bad batches
through. This script trains every task of ``benchmarks/stability.py`` without protection and
with the guard at the bounds of ``VARIANTS``, 6 seeds per learning rate::

    python benchmarks/skip_on_spike_bounds.py            # ~6 minutes on 2 CPU cores
    python benchmarks/skip_on_spike_bounds.py --tasks transformer --seeds 3

Results: ``benchmarks/results/skip_on_spike_bounds/`` (``stability.json``, ``.md`` and plots,
as the suite writes them).
"""

from __future__ import annotations

import sys
from pathlib import Path

import gradsafe as gs

# The scripts run as files and are loaded by path in the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import stability


def _bounded(bound: int | None) -> stability.Builder:
    return lambda opt, steps: gs.skip_on_spike(opt, max_consecutive_skips=bound)


# name -> builder of the method around each task's optimizer
VARIANTS: dict[str, stability.Builder] = {
    "none": stability.METHODS["none"],
    **{f"skip_on_spike(max_consecutive_skips={k})": _bounded(k) for k in (2, 3, 4, 8)},
}
TASKS = (
    "adding_rnn",
    "adding_irnn",
    "transformer",
    "spiky_regression",
    "deep_mlp",
    "adagrad_spiky",
    "rss_momentum_spiky",
)


def main(argv: list[str] | None = None) -> int:
    return stability.run_variants(
        VARIANTS,
        argv,
        description=__doc__.split("\n")[0],
        tasks=TASKS,
        out=Path(__file__).resolve().parent / "results" / "skip_on_spike_bounds",
    )


if __name__ == "__main__":
    sys.exit(main())
