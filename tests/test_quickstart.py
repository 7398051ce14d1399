"""The quickstart runs end to end (in its --quick size): exit status 0 and a PNG."""

import os
import subprocess
import sys
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_quick_rescues_and_writes_png(tmp_path):
    out = tmp_path / "plot.png"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(QUICKSTART), "--quick", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESCUED" in result.stdout and "NOT RESCUED" not in result.stdout
    assert "steps clipped" in result.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in result.stdout


def test_quickstart_rejects_bad_steps(tmp_path):
    result = subprocess.run(
        [sys.executable, str(QUICKSTART), "--steps", "-1", "--out", str(tmp_path / "x.png")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--steps" in result.stderr
    assert not (tmp_path / "x.png").exists()
