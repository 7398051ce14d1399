"""How far the divergence counts move when only the rounding changes: the noise floor.

At the largest learning rates of ``benchmarks/stability.py`` a run is chaotic: the smallest
change to the arithmetic sends it elsewhere, and whether it ends above its initial loss is a
coin flip. This script puts a number on that. Next to each method it trains a twin that takes
the same decisions but is compiled differently:

* ``skip_on_spike(sigma=1e9)`` never refuses a finite step: the same updates as no guard, with
  the guard's program around them;
* ``split_clip(max_residual_ratio=0.0)`` carries nothing: the plain clip's updates, inside
  ``split_clip``'s program;

and, for comparison, ``optax.clip_by_global_norm(1.0)``: the same clip as
``gs.clip_by_global_norm(1.0)`` summed in another order, but not a twin on a finite
gradient whose sum of squares overflows float32, which gradsafe's clip still bounds and
Optax's does not.

The three tasks where the clipping methods still diverge (the two adding problems and the
Transformer), at their two largest learning rates, with 24 seeds per learning rate::

    python benchmarks/rounding_noise.py            # ~10 minutes on 2 CPU cores
    python benchmarks/rounding_noise.py --tasks transformer --lrs 1.0 --seeds 6

A count tells a method apart from rounding noise only where it differs from its twin's by
more than the twin's differs from the method it copies. Results:
``benchmarks/results/rounding_noise/`` (as the suite writes them).
"""

from __future__ import annotations

import sys
from pathlib import Path

# The scripts run as files and are loaded by path in the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import stability

# the suite's methods, each next to its twin (stability.CONTROLS), and Optax's clip
VARIANTS: dict[str, stability.Builder] = {
    name: stability.METHODS[name]
    for name in (
        "none",
        "skip_on_spike(sigma=1e9) (never refuses)",
        "gs.skip_on_spike(opt)",
        "gs.clip_by_global_norm(1.0)",
        "optax.clip_by_global_norm(1.0)",
        "split_clip(max_residual_ratio=0.0) (carries nothing)",
        "gs.split_clip()",
    )
}
TASKS = ("adding_rnn", "adding_irnn", "transformer")
LRS = (0.3, 1.0)
SEEDS = 24


def main(argv: list[str] | None = None) -> int:
    return stability.run_variants(
        VARIANTS,
        argv,
        description=__doc__.split("\n")[0],
        tasks=TASKS,
        out=Path(__file__).resolve().parent / "results" / "rounding_noise",
        seeds=SEEDS,
        lrs=LRS,
    )


if __name__ == "__main__":
    sys.exit(main())
