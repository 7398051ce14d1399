"""Every example script runs end to end in its --quick size, as a user would run it.

Each runs in a subprocess (a fresh interpreter: ``sharded_train.py`` must configure its 8 CPU
devices before JAX starts) from a temporary directory, and must exit 0, print its verdict and
write a PNG where ``--out`` says. These runs are slow (``pytest -m slow``, as CI does).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# script -> lines its --quick run must print (its verdict and the numbers behind it)
EXPECTED = {
    "flax_nnx_train.py": ["SURVIVED", "steps refused (non-finite): 1", "zclip/norm=", "spikes:"],
    "flax_linen_train.py": ["OK", "refused=True (loss_spike)", "test accuracy"],
    "sharded_train.py": ["EQUAL", "shard_map + axis_name", "P(None, 'model')"],
    "mixed_precision.py": ["OK", "float16 + scaling", "overflow steps refused", "hidden layers"],
    "sparse_regression.py": ["SUPPORT RECOVERED", "sgd + prox_l1 (ISTA)"],
    "text_lm.py": ["byte-frequency baseline:", "stabilize: ZClip clipped", "update limit acted"],
}
VERDICTS = ("STABILIZE HELPED", "STABILIZE HURT", "NO CLEAR DIFFERENCE")


def run_example(script: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}
    env.pop("XLA_FLAGS", None)  # the script decides its own device count
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_quick_run(script, tmp_path):
    out = tmp_path / "plots" / "figure.png"
    out.parent.mkdir()
    result = run_example(script, tmp_path, "--quick", "--out", str(out))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    for line in EXPECTED[script]:
        assert line in result.stdout, f"{line!r} missing from the output of {script}:\n{log}"
    assert "NOT" not in result.stdout.splitlines()[-1], log
    if script == "text_lm.py":
        check_text_lm_verdict(result.stdout)
    # Log lines carry a few chosen figures, not every metric of the optimizer state.
    for line in result.stdout.splitlines():
        if line.startswith("step "):
            assert line.count("=") <= 8, line
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert f"plot saved to {out}" in result.stdout


def check_text_lm_verdict(stdout: str) -> None:
    """The printed verdict is the one the script's stated criterion gives for its printed
    figures: learned = final held-out loss below the byte-frequency baseline; a 5% margin."""
    baseline = float(re.search(r"byte-frequency baseline: ([\d.]+)", stdout).group(1))
    final = {
        name: float(value)
        for name, value in re.findall(r"^(AdamW|stabilize\(AdamW\))\s+(\S+)\s", stdout, re.M)
    }
    plain, safe = final["AdamW"], final["stabilize(AdamW)"]
    plain_ok, safe_ok = plain < baseline, safe < baseline  # NaN compares False: not learned
    if safe_ok != plain_ok:
        expected = "STABILIZE HELPED" if safe_ok else "STABILIZE HURT"
    elif not safe_ok:
        expected = "NO CLEAR DIFFERENCE"
    elif safe <= 0.95 * plain:
        expected = "STABILIZE HELPED"
    elif plain <= 0.95 * safe:
        expected = "STABILIZE HURT"
    else:
        expected = "NO CLEAR DIFFERENCE"
    printed = [line for line in stdout.splitlines() if line.startswith(VERDICTS)]
    assert len(printed) == 1 and printed[0].startswith(expected + ":"), (expected, printed)


@pytest.mark.slow
def test_examples_reject_bad_arguments(tmp_path):
    """argparse errors (exit 2) name the argument, and nothing is written."""
    result = run_example("sparse_regression.py", tmp_path, "--steps", "0")
    assert result.returncode == 2
    assert "--steps" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_every_example_is_tested():
    """Each example script is run by some test file (this one, or one of its own)."""
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    untested = [p.name for p in EXAMPLES.glob("*.py") if f'"{p.name}"' not in tests]
    assert not untested


def test_slow_list_names_existing_tests():
    """Every entry of conftest's SLOW_TESTS names a test file (and test) that exists, so a
    renamed test cannot silently move into the fast suite's time."""
    from conftest import SLOW_TESTS

    tests = Path(__file__).parent
    for entry in SLOW_TESTS:
        file, _, name = entry.partition("::")
        name = name.split("[")[0]
        assert (tests / file).is_file(), entry
        if name:
            assert f"def {name}(" in (tests / file).read_text(), entry
