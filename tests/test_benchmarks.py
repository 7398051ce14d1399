"""The overhead benchmark runs end to end in its --quick size and writes consistent results."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scripts import load_script

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


@pytest.mark.parametrize(
    ("args", "named"),
    [(["--only", "no_such_clipper"], "no_such_clipper"), (["--sizes", "64by1M"], "64by1M")],
)
def test_overhead_rejects_unknown_name_and_bad_size(args, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(OVERHEAD, "overhead_benchmark").main(["--quick", *args])
    assert exit_info.value.code == 2 and named in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# benchmarks/step.py: the whole training step and the HLO pass count
# ------------------------------------------------------------------------------------------

STEP = ROOT / "benchmarks" / "step.py"


@functools.cache
def _load_step():
    return load_script(STEP, "step_benchmark")


HAND_WRITTEN_HLO = """HloModule m

%fused_add (p0: f32[1024], p1: f32[1024]) -> f32[1024] {
  %p0 = f32[1024]{0} parameter(0)
  %p1 = f32[1024]{0} parameter(1)
  ROOT %add = f32[1024]{0} add(%p0, %p1)
}

%big (t: (f32[1024], f32[1024])) -> f32[1024] {
  %t = (f32[1024]{0}, f32[1024]{0}) parameter(0)
  %a = f32[1024]{0} get-tuple-element(%t), index=0
  %b = f32[1024]{0} get-tuple-element(%t), index=1
  ROOT %f = f32[1024]{0} fusion(%a, %b), kind=kLoop, calls=%fused_add
}

%small (t: (f32[1024], f32[1024])) -> f32[1024] {
  %t = (f32[1024]{0}, f32[1024]{0}) parameter(0)
  ROOT %a = f32[1024]{0} get-tuple-element(%t), index=0
}

ENTRY %main (x: f32[1024], y: f32[1024]) -> f32[1024] {
  %x = f32[1024]{0} parameter(0)
  %y = f32[1024]{0} parameter(1)
  %c = f32[1024]{0} copy(%x)
  %s = f32[] fusion(%y), kind=kCustom, calls=%fused_add
  %p = pred[] constant(true)
  %t = (f32[1024]{0}, f32[1024]{0}) tuple(%c, %y)
  ROOT %r = f32[1024]{0} conditional(%p, %t, %t), true_computation=%big, false_computation=%small
}
"""


def test_hlo_traffic_counts_kernels_and_the_heavier_branch():
    step = _load_step()
    traffic = step.hlo_traffic(HAND_WRITTEN_HLO)
    # copy: read 4 KiB + write 4 KiB; reduction: read 4 KiB + write 4 bytes; the conditional
    # counts its heavier branch: a fusion reading two arrays and writing one (12 KiB).
    assert traffic == {"bytes": 8192 + 4100 + 12288, "kernels": 3, "copies": 1}
    with pytest.raises(ValueError, match="ENTRY"):
        step.hlo_traffic("HloModule empty\n")


def test_hlo_traffic_of_a_compiled_elementwise_step():
    import jax
    import jax.numpy as jnp

    step = _load_step()
    x = jnp.ones((256, 256), jnp.float32)
    compiled = jax.jit(lambda a, b: a * 2 + b, donate_argnums=0).lower(x, x).compile()
    traffic = step.hlo_traffic(compiled.as_text())
    assert traffic["bytes"] == 3 * x.nbytes  # read a and b, write the result: one kernel
    assert traffic["kernels"] == 1


def test_hlo_traffic_leaves_out_the_overflow_branch():
    """A global-norm clip reads the gradient once for its norm on an ordinary step; the
    branch that rescales an overflowing norm (two more reads) is not counted."""
    import jax
    import jax.numpy as jnp

    import gradsafe as gs

    step = _load_step()
    tx = gs.clip_by_global_norm(1.0)
    g = jnp.ones((512, 512), jnp.float32)
    compiled = jax.jit(lambda g, s: tx.update(g, s)[0]).lower(g, tx.init(g)).compile()
    text = compiled.as_text()
    assert step.RARE_BRANCH in text
    # the norm's reduction reads g; the scaling reads g and writes the output
    assert step.hlo_traffic(text)["bytes"] // g.nbytes == 3


def test_step_sizes_parse():
    step = _load_step()
    assert step.parse_size("4x2M+256x4K") == [(4, 2 * 2**20), (256, 4096)]
    with pytest.raises(ValueError, match="64by1M"):
        step.parse_size("64by1M")


def test_step_quick_writes_json_and_markdown(tmp_path):
    result = subprocess.run(
        [sys.executable, str(STEP), "--quick", "--only", "skip_nonfinite(opt)", "--out-dir",
         str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "step.json").read_text())
    page = (tmp_path / "step.md").read_text()
    assert report["stacks"] == ["gs.skip_nonfinite(opt)"]
    (case,) = report["cases"].values()
    entry = case["stacks"]["gs.skip_nonfinite(opt)"]
    assert entry["bare"]["x_bare"] == 1.0 and entry["bare"]["passes"] > 0
    for side in ("gradsafe", "optax"):
        figures = entry[side]
        assert figures["ms"] > 0 and figures["passes"] > 0 and figures["kernels"] > 0
        ratio = figures["ms"] / entry["bare"]["ms"]
        assert abs(figures["x_bare"] - ratio) < 1e-9
    assert "`gs.skip_nonfinite(opt)`" in page and "Compile time" in page
    assert set(report["compile"]["8"]) >= {"gs.stabilize(adam)", "optax.adam(1e-3)"}


def test_step_rejects_an_unknown_stack(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load_step().main(["--quick", "--only", "no_such_stack"])
    assert exit_info.value.code == 2 and "no_such_stack" in capsys.readouterr().err


def _load_guard_floor():
    return load_script(ROOT / "benchmarks" / "guard_floor.py", "guard_floor_benchmark")


def test_guard_floor_programs_agree_and_refuse_a_nan_step():
    import jax
    import jax.numpy as jnp

    floor = _load_guard_floor()
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
    zeros = {"w": jnp.zeros((3, 4))}
    grads = {"w": jnp.full((3, 4), 0.01)}
    bare = floor.bare(params, zeros, zeros, grads)
    bad = {"w": grads["w"].at[1, 1].set(jnp.nan)}
    for name, program in floor.PROGRAMS.items():
        accepted = jax.jit(program)(params, zeros, zeros, grads)
        if "limit" not in name:  # the clip and the limit change the update
            for got, want in zip(accepted, bare, strict=True):
                np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6, err_msg=name)
        if name != "bare":
            refused = jax.jit(program)(params, zeros, zeros, bad)
            np.testing.assert_array_equal(refused[0]["w"], params["w"], err_msg=name)


def test_guard_floor_writes_its_results(tmp_path):
    floor = _load_guard_floor()
    argv = ["--sizes", "1x1K", "--repeats", "1", "--warmup", "0", "--out-dir", str(tmp_path)]
    assert floor.main(argv) == 0
    report = json.loads((tmp_path / "guard_floor.json").read_text())
    case = report["cases"]["1x1K"]
    assert set(case) == set(floor.PROGRAMS) and case["bare"]["x_bare"] == 1.0
    assert "cond(update)" in (tmp_path / "guard_floor.md").read_text()
