"""The scripts that compare settings of one method on the stability suite's tasks
(benchmarks/split_clip_variants.py, benchmarks/skip_on_spike_bounds.py,
benchmarks/rounding_noise.py): their variants build, bad names are rejected, and a small run
reports every variant asked for, at the learning rates asked for."""

import json
import math
from pathlib import Path

import jax.numpy as jnp
import optax
import pytest
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
split_clip = load_script(ROOT / "benchmarks" / "split_clip_variants.py", "split_clip_variants")
skip_bounds = load_script(ROOT / "benchmarks" / "skip_on_spike_bounds.py", "skip_on_spike_bounds")
noise = load_script(ROOT / "benchmarks" / "rounding_noise.py", "rounding_noise")
SCRIPTS = {"split_clip_variants": split_clip, "skip_on_spike_bounds": skip_bounds, "noise": noise}


def test_every_split_clip_variant_builds_and_clips():
    params = {"w": jnp.ones((3, 2), jnp.float32)}
    grads = {"w": jnp.full((3, 2), 5.0, jnp.float32)}
    for name, make in split_clip.VARIANTS.items():
        tx = make()
        updates, _ = tx.update(grads, tx.init(params), params)
        assert float(jnp.linalg.norm(updates["w"])) <= 1.0 + 1e-6, name  # all clip at 1


def test_every_skip_on_spike_bound_builds_and_takes_a_step():
    params = {"w": jnp.ones(2, jnp.float32)}
    for name, build in skip_bounds.VARIANTS.items():
        tx = optax.with_extra_args_support(build(optax.sgd(0.1), 10))
        updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params, value=jnp.array(1.0))
        assert jnp.allclose(updates["w"], -0.1), name


def test_the_rounding_twins_take_the_same_step_as_their_method():
    params = {"w": jnp.ones(3, jnp.float32)}
    grads = {"w": jnp.array([3.0, -4.0, 0.0], jnp.float32)}  # norm 5: every clip acts
    # the suite's controls, and Optax's clip (a twin on gradients whose squares do not overflow)
    twins = [(method, control) for control, method in noise.stability.CONTROLS.items()]
    assert len(twins) == 2 and all(name in noise.VARIANTS for pair in twins for name in pair)
    twins.append(("gs.clip_by_global_norm(1.0)", "optax.clip_by_global_norm(1.0)"))
    for method, twin in twins:
        steps = []
        for name in (method, twin):
            tx = optax.with_extra_args_support(noise.VARIANTS[name](optax.sgd(0.1), 10))
            state = tx.init(params)
            for _ in range(3):  # the residual-free twin carries nothing into later steps
                updates, state = tx.update(grads, state, params, value=jnp.array(1.0))
            steps.append(updates["w"])
        assert jnp.allclose(*steps, rtol=1e-6), (method, twin)


def test_lrs_outside_the_grid_and_lrs_with_merge_are_refused(tmp_path, capsys):
    # (the slow small run below checks that --lrs keeps only the learning rates asked for)
    argv = ["--tasks", "deep_mlp", "--seeds", "1", "--variants", "none", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        noise.main([*argv, "--lrs", "7.0"])
    assert "7.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        noise.stability.main(["--tasks", "deep_mlp", "--lrs", "0.1", "--merge"])
    assert "--merge" in capsys.readouterr().err


def test_skip_on_spike_bounds_cover_every_task_of_the_suite():
    tasks = skip_bounds.stability.build_tasks(quick=True)
    assert list(skip_bounds.TASKS) == [task.name for task in tasks]


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_variant_is_rejected(script, capsys):
    with pytest.raises(SystemExit):
        SCRIPTS[script].main(["--variants", "no_such_variant"])
    assert "no_such_variant" in capsys.readouterr().err


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_small_run_reports_every_variant_asked_for(script, tmp_path):
    names = list(SCRIPTS[script].VARIANTS)[:2]
    argv = ["--tasks", "deep_mlp", "--seeds", "1", "--variants", *names, "--out", str(tmp_path)]
    # the two smallest learning rates of the grid, where no method diverges
    assert SCRIPTS[script].main([*argv, "--lrs", "0.01", "0.03", "--first-seed", "7"]) == 0
    report = json.loads((tmp_path / "stability.json").read_text())
    assert report["seeds"] == 1 and list(report["tasks"]) == ["deep_mlp"]
    assert report["first_seed"] == 7
    entries = report["tasks"]["deep_mlp"]["methods"]
    assert set(entries) == set(names)
    lrs = report["tasks"]["deep_mlp"]["lrs"]
    assert lrs == [0.01, 0.03]
    assert all(entries[n]["runs"] == len(lrs) for n in names)  # one seed at every LR
    assert all(math.isfinite(float(entries[n]["best_lr_median_final_loss"])) for n in names)
