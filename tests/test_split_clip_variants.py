"""benchmarks/split_clip_variants.py: its variants build, and it runs the suite's tasks."""

import json
import math
from pathlib import Path

import jax.numpy as jnp
import pytest
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
variants = load_script(ROOT / "benchmarks" / "split_clip_variants.py", "split_clip_variants")


def test_every_variant_builds_and_takes_a_step():
    params = {"w": jnp.ones((3, 2), jnp.float32)}
    grads = {"w": jnp.full((3, 2), 5.0, jnp.float32)}
    for name, make in variants.VARIANTS.items():
        tx = make()
        updates, _ = tx.update(grads, tx.init(params), params)
        assert float(jnp.linalg.norm(updates["w"])) <= 1.0 + 1e-6, name  # all clip at 1


def test_unknown_variant_is_rejected(capsys):
    with pytest.raises(SystemExit):
        variants.main(["--variants", "no_such_variant"])
    assert "no_such_variant" in capsys.readouterr().err


def test_a_small_run_reports_every_variant_asked_for(tmp_path):
    names = list(variants.VARIANTS)[:2]
    assert (
        variants.main(
            ["--tasks", "deep_mlp", "--seeds", "1", "--variants", *names, "--out", str(tmp_path)]
        )
        == 0
    )
    report = json.loads((tmp_path / "stability.json").read_text())
    assert report["seeds"] == 1 and list(report["tasks"]) == ["deep_mlp"]
    assert set(report["tasks"]["deep_mlp"]["methods"]) == set(names)
    entries = report["tasks"]["deep_mlp"]["methods"]
    assert all(math.isfinite(float(entries[n]["median_final_loss"])) for n in names)
