"""The quickstart runs end to end (in its --quick size) and its verdict follows its criterion.

Slow (a subprocess training two runs): ``pytest -m slow`` runs it, as CI does.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
MEAN_PREDICTOR_MSE = 1 / 6
SOLVED_BELOW = 0.5 * MEAN_PREDICTOR_MSE  # the criterion the script states


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, str(QUICKSTART), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_quickstart_quick_verdict_follows_its_criterion(tmp_path):
    out = tmp_path / "plot.png"
    result = run(tmp_path, "--quick", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    row = re.search(r"final loss \(last steps\) \|\s*(\S+) \|\s*(\S+)", result.stdout)
    assert row, result.stdout
    plain, safe = (float(value) for value in row.groups())
    # The verdict printed is the one the stated criterion gives for the printed losses.
    assert safe < SOLVED_BELOW <= plain, result.stdout
    assert "RESCUED: gradsafe solved the task, plain Adam did not" in result.stdout
    assert "NOT RESCUED" not in result.stdout
    assert "steps clipped" in result.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in result.stdout


def test_quickstart_rejects_bad_steps(tmp_path):
    result = run(tmp_path, "--steps", "-1", "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert "--steps" in result.stderr
    assert not (tmp_path / "x.png").exists()


def _quickstart_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart_example", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("plain_loss", "safe_loss", "verdict"),
    [
        (1.25, 0.173, False),  # gradsafe only learned the mean: not a rescue
        (0.163, 0.03, True),
        (float("nan"), 0.03, True),
        (0.02, 0.03, False),  # both solved: nothing to rescue
        (0.163, float("nan"), False),
    ],
)
def test_rescued_requires_solving_the_task(plain_loss, safe_loss, verdict):
    import numpy as np

    quickstart = _quickstart_module()

    def history(loss: float):
        values = np.full(100, loss, np.float32)
        flags = np.zeros(100, bool)
        return quickstart.History(values, values, flags, flags, 0.0)

    ok, reason = quickstart.rescued(history(plain_loss), history(safe_loss))
    assert ok is verdict, reason
