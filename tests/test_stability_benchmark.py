"""The stability benchmark runs end to end in its --quick size and writes consistent results."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "stability.py"


stability = load_script(SCRIPT, "stability_benchmark")


def test_quick_run_writes_json_markdown_and_plots(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "stability.json").read_text())
    page = (tmp_path / "stability.md").read_text()
    assert report["quick"] is True
    assert set(report["tasks"]) == {t.name for t in stability.build_tasks(quick=True)}
    assert stability.STABILIZE in report["methods"]
    for task_name, task in report["tasks"].items():
        assert f"`{task_name}`" in page
        png = tmp_path / f"stability_{task_name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert set(task["methods"]) == set(report["methods"])
        for name, entry in task["methods"].items():
            assert f"`{name}`" in page
            diverged = np.asarray(entry["diverged"])
            assert diverged.shape == (len(task["lrs"]), report["seeds"])
            assert entry["runs"] == diverged.size
            assert entry["diverged_runs"] == int(diverged.sum())
            assert math.isclose(entry["divergence_rate"], diverged.mean())
            blown_up = np.asarray(entry["blown_up"])
            final = np.asarray(entry["final_loss"], np.float64)
            initial = np.asarray(entry["initial_loss"])
            expected = ~np.isfinite(final) | (final > stability.BLOWUP_FACTOR * initial)
            np.testing.assert_array_equal(blown_up, expected)
            assert not (blown_up & ~diverged).any()  # a blow-up is also a divergence
            assert entry["blown_up_runs"] == int(blown_up.sum())
            assert entry["ms_per_step"] > 0
            span = entry["stable_lr_range"]
            if span is not None:  # the range holds exactly the LRs where no seed diverged
                first, last = task["lrs"].index(span[0]), task["lrs"].index(span[1])
                assert not diverged[first : last + 1].any()
                assert entry["stable_lr_points"] == last - first + 1


def test_every_method_builds_and_takes_a_step_with_the_loss():
    params = {"w": jnp.ones((3, 2), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    for name, builder in stability.METHODS.items():
        tx = builder(stability.optax.sgd(0.1), 100)
        state = tx.init(params)
        updates, state = tx.update(grads, state, params, value=jnp.float32(1.0))
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates)), name


def test_stable_range_is_the_widest_contiguous_run():
    rng = stability.stable_range
    assert rng(np.array([False, False, True, False, False, False])) == (3, 5)
    assert rng(np.array([True, False, False, True, False, False])) == (4, 5)  # tie: higher LRs
    assert rng(np.array([True, True])) is None
    assert rng(np.array([False])) == (0, 0)


def test_spike_count_uses_the_median_of_the_previous_window():
    losses = np.ones((2, 120))
    losses[0, [60, 90]] = 2.0  # two spikes above 1.5x the running median
    losses[1, 70] = 1.4  # below the factor: not a spike
    losses[1, 100:] = np.nan  # a diverged run: nothing counted after the first NaN
    assert stability.count_spikes(losses).tolist() == [2, 0]


@pytest.mark.parametrize("task", stability.build_tasks(quick=True), ids=lambda t: t.name)
def test_tasks_draw_a_batch_per_step_and_a_fixed_held_out_batch(task):
    params, train, held_out = stability.draw(task, seeds=2)
    for leaf in jax.tree.leaves(train):
        assert leaf.shape[:2] == (2, task.steps)
    assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves((params, held_out)))
    again = stability.draw(task, seeds=2)  # seeded: the same draw every time
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves((params, train)), jax.tree.leaves(again[:2]), strict=True)
    )
    # --first-seed draws later seeds: seed 1 of the suite is the first of first_seed=1
    later = stability.draw(task, seeds=1, first_seed=1)
    for whole, one in zip(
        jax.tree.leaves((params, train)), jax.tree.leaves(later[:2]), strict=True
    ):
        assert np.array_equal(whole[1:], one)


def test_first_seed_is_reported_checked_and_kept_apart_by_merge(capsys):
    report = {"quick": False, "seeds": 12, "first_seed": 1000, "date": "d", "platform": "p"}
    report |= {"cpu_count": 2, "jax": "j", "optax": "o", "methods": [], "tasks": {}}
    assert "12 seeds per learning rate (seeds 1000-1011)." in stability.markdown(report)
    suite = {**report, "first_seed": 0}
    assert "12 seeds per learning rate." in stability.markdown(suite)
    with pytest.raises(ValueError, match="first_seed"):
        stability.merge(suite, report)
    before = {k: v for k, v in suite.items() if k != "first_seed"}  # a report from before
    assert stability.merge(before, suite)["first_seed"] == 0
    with pytest.raises(SystemExit):
        stability.main(["--first-seed", "-1", "--tasks", "deep_mlp"])
    assert "--first-seed must be >= 0" in capsys.readouterr().err


def _entry(final, initial, date):
    lrs = (0.1, 1.0)
    final = np.asarray(final, np.float64)
    initial = np.asarray(initial, np.float64)
    entry = {
        "final_loss": final.tolist(),
        "median_initial_loss": float(np.median(initial)),
        "initial_loss": initial.tolist(),
        "date": date,
        **stability.blowup_fields(lrs, final, initial),
    }
    return lrs, entry


def test_merge_keeps_the_runs_not_repeated_and_fills_the_blowup_criterion():
    lrs, fresh = _entry([[1.0, 5.0], [0.5, 0.5]], [[2.0, 2.0], [2.0, 2.0]], "new")
    _, kept = _entry([[9.0, 1.0], [np.inf, 1.0]], [[2.0, 2.0], [2.0, 2.0]], "old")
    for key in ("blown_up", "blowup_rate", "blown_up_runs", "initial_loss", "date"):
        del kept[key]  # as in a report written before the blow-up criterion
    task = {"lrs": list(lrs), "steps": 10}
    old = {"quick": False, "seeds": 2, "date": "old", "methods": ["none", "gs.zclip()"]}
    old["tasks"] = {"t": {**task, "methods": {"none": kept, "gs.zclip()": kept}}}
    new = {"quick": False, "seeds": 2, "date": "new", "methods": ["gs.zclip()"]}
    new["tasks"] = {"t": {**task, "methods": {"gs.zclip()": fresh}}}
    merged = stability.merge(old, new)
    methods = merged["tasks"]["t"]["methods"]
    assert merged["methods"] == ["none", "gs.zclip()"]  # METHODS order
    assert methods["gs.zclip()"] is fresh or methods["gs.zclip()"] == fresh
    assert methods["none"]["date"] == "old"
    assert methods["none"]["blown_up"] == [[True, False], [True, False]]
    assert merged["merged"] is True
    with pytest.raises(ValueError, match="seeds"):
        stability.merge({**old, "seeds": 3}, new)
    moved = {**new, "tasks": {"t": {**new["tasks"]["t"], "lrs": [0.2, 1.0]}}}
    with pytest.raises(ValueError, match="grid"):
        stability.merge(old, moved)


def test_controls_are_methods_named_with_what_they_copy():
    for control, original in stability.CONTROLS.items():
        assert control in stability.METHODS and original in stability.METHODS
    report = {"quick": False, "seeds": 6, "date": "d", "platform": "p", "cpu_count": 2}
    report |= {"jax": "j", "optax": "o", "tasks": {}}
    control = "skip_on_spike(sigma=1e9) (never refuses)"
    text = stability.markdown({**report, "methods": ["none", control]})
    assert f"Controls: `{control}` takes the steps of `none`" in text
    assert "Controls:" not in stability.markdown({**report, "methods": ["none"]})
