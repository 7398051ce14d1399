"""The overhead benchmark runs end to end in its --quick size and writes consistent results."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERHEAD = ROOT / "benchmarks" / "overhead.py"


def _run(*args, cwd):
    return subprocess.run(
        [sys.executable, str(OVERHEAD), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_overhead_quick_writes_json_and_markdown(tmp_path):
    result = _run("--quick", "--out-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "overhead.json").read_text())
    page = (tmp_path / "overhead.md").read_text()
    names = {
        "clip_by_global_norm",
        "clip_by_value",
        "clip_by_block_rms",
        "adaptive_grad_clip",
        "clip_by_leaf_norm",
    }
    assert names <= set(report["entries"])
    assert report["repeats"] >= 3
    for size, info in report["sizes"].items():
        assert size in page
        assert info["copy_bandwidth_gb_s"] > 0
        assert names <= set(info["entries"])
        for name, entry in info["entries"].items():
            assert f"`{name}`" in page
            assert entry["gradsafe_ms"] > 0 and entry["baseline_ms"] > 0
            assert abs(entry["ratio"] - entry["gradsafe_ms"] / entry["baseline_ms"]) < 1e-9
            assert entry["gradsafe_bound_fraction"] > 0


def test_overhead_only_and_sizes_filter(tmp_path):
    result = _run(
        "--quick",
        "--only",
        "clip_by_value",
        "--sizes",
        "2x1K",
        "--out-dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "overhead.json").read_text())
    assert report["entries"] == ["clip_by_value"]
    assert list(report["sizes"]) == ["2x1K"]
    info = report["sizes"]["2x1K"]
    assert (info["leaves"], info["elements_per_leaf"]) == (2, 1024)
    assert info["tree_bytes"] == 2 * 1024 * 4


def test_overhead_quick_without_out_dir_writes_nothing(tmp_path):
    result = _run("--quick", "--only", "clip_by_value", "--sizes", "1x1K", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not list(tmp_path.iterdir())


def test_overhead_rejects_unknown_name_and_bad_size(tmp_path):
    unknown = _run("--quick", "--only", "no_such_clipper", cwd=tmp_path)
    assert unknown.returncode == 2 and "no_such_clipper" in unknown.stderr
    bad = _run("--quick", "--sizes", "64by1M", cwd=tmp_path)
    assert bad.returncode == 2 and "64by1M" in bad.stderr
