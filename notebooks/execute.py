"""Run the notebooks top to bottom at their small size and store the outputs in them.

    python notebooks/execute.py                      # every notebook
    python notebooks/execute.py 04_text_lm.ipynb     # one

The stored outputs (plots, tables, printed figures) let a reader see the results without
running anything; they come from the small size (``GRADSAFE_NOTEBOOK_SMALL=1``), which the
test suite also runs. The kernel imports gradsafe from this checkout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def execute(path: Path, *, cwd: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """Execute ``path`` in a fresh kernel at the small size; returns the executed notebook."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the notebook's own JAX
    env["GRADSAFE_NOTEBOOK_SMALL"] = "1"
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,  # no timestamps: re-running changes only what the code prints
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute(env=env)  # raises CellExecutionError on the first failing cell
    return nb


def main(names: list[str]) -> int:
    paths = [HERE / name for name in names] if names else sorted(HERE.glob("*.ipynb"))
    for path in paths:
        print(f"executing {path.name} ...", flush=True)
        nb = execute(path, cwd=HERE)
        nbformat.write(nb, path)
        print(f"  stored outputs in {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
