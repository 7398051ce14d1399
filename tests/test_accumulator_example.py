"""examples/accumulator_spike.py runs in its --quick size and shows what it claims."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "accumulator_spike.py"


@pytest.mark.slow
def test_accumulator_example_quick(tmp_path):
    out = tmp_path / "accumulator_spike.png"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^(.+?)\s+([-\d.e+]+)\s+([-\d.e+]+)\s+([-\d.e+]+)\s+([-\d.e+]+)$", line)
        if match:
            rows[match.group(1).strip()] = [float(v) for v in match.groups()[1:]]
    assert set(rows) == {
        "adagrad, no spike",
        "adagrad",
        "clip -> adagrad",
        "rss + momentum",
        "clip -> rss + momentum",
    }
    for name in ("adagrad", "rss + momentum"):
        before, after, _, final = rows[name]
        assert after > 100 * before  # the spike dominates the accumulator for good
        protected = rows[f"clip -> {name}"]
        assert protected[1] < 2 * protected[0]  # clipped first: the spike barely shows
        assert protected[3] < final  # and the final loss is lower
