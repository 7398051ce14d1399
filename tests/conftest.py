"""Test configuration: 8 virtual CPU devices (sharding tests run anywhere), strict dtypes, and
the ``slow`` marker for tests in files whose owners mark them here.

Slow tests (a script, notebook or benchmark run end to end in a subprocess) are deselected by
default (``addopts`` in pyproject.toml has ``-m 'not slow'``); ``pytest -m slow`` runs only
them, and CI runs both. Mark a slow test with ``@pytest.mark.slow`` (or a whole module with
``pytestmark = pytest.mark.slow``); ``SLOW_TESTS`` below marks tests by name where that is
simpler than editing the file.
"""

import os
from pathlib import Path

import hypothesis
import jax
import pytest

ROOT = Path(__file__).resolve().parent.parent

# XLA's cheapest backend level (LLVM without its expensive passes) compiles the suite's
# thousands of small programs about 10% faster. Read once, when the backend starts: the
# variable is restored afterwards so that the scripts run by the slow tests compile as usual.
_flags = os.environ.get("XLA_FLAGS")
os.environ["XLA_FLAGS"] = f"{_flags or ''} --xla_backend_optimization_level=0".strip()
jax.config.update("jax_num_cpu_devices", 8)
jax.devices()
if _flags is None:
    del os.environ["XLA_FLAGS"]
else:
    os.environ["XLA_FLAGS"] = _flags
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Compiled programs are shared between the test processes and kept for the next run: most of
# the suite's time is XLA compiling small programs, many of them the same program built by
# different tests (the cache key is the program itself). Delete the folder to start cold.
jax.config.update("jax_compilation_cache_dir", str(ROOT / ".pytest_cache" / "jax-compilation"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

hypothesis.settings.register_profile(
    "gradsafe", max_examples=40, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.load_profile("gradsafe")

# "file.py" marks every test of that file slow; "file.py::test_name" marks one test (all of
# its parametrizations); "file.py::test_name[id]" one parametrization. Entries: the benchmark
# scripts' end-to-end quick runs, and the tests that `pytest --durations=60` showed taking
# 25-170 s each on a loaded 2-core machine (eager property tests over many hypothesis
# examples), ten times the typical test.
SLOW_TESTS = frozenset(
    {
        "test_benchmarks.py",
        "test_stability_benchmark.py::test_quick_run_writes_json_markdown_and_plots",
        "test_variant_scripts.py::test_a_small_run_reports_every_variant_asked_for",
        "test_clipping.py::test_block_rms_reaches_target_like_optax_tests",
        "test_clipping.py::test_leaf_norm_property",
        "test_clipping.py::test_block_rms_property",
        "test_clipping.py::test_agc_property",
        "test_numerics.py::test_global_norm_matches_numpy",
        "test_numerics.py::test_packed_global_norm_equals_the_per_leaf_one[1.0]",
        "test_clipping.py::test_global_norm_bounds_direction_idempotence",
        "test_clipping.py::test_agc_matches_optax",
        "test_clipping.py::test_value_property",
        "test_regularization.py::test_add_l2_equals_grad_of_penalty_and_optax",
        # the cross-cutting checks of every transform: each compiles every factory several
        # times (minutes of compilation on 2 cores); CI runs them in its slow step
        "test_failclosed.py",
        "test_transform_matrix.py",
        "test_multiprocess.py",
        "test_numerics.py::test_packed_global_norm_equals_the_per_leaf_one",
        "test_split_clip.py::test_property_default_cap_keeps_the_residual_within_ratio_times_bound",
        "test_split_clip.py::test_property_update_within_bound_and_mass_conserved_without_caps",
        "test_skip_on_spike.py::test_property_spike_refusals_in_a_row_never_exceed_the_bound",
        "test_adaptive_sharding.py::test_shard_map_every_device_takes_the_same_decision",
        "test_overflow.py::test_clip_by_global_norm_obeys_its_bound_for_every_finite_input",
        # whole training runs and long histories (1-5 s each, 60 s together): the default run
        # keeps the unit checks of the same behaviour
        "test_guards_training.py",
        "test_checkpoints.py::test_resumed_run_matches_uninterrupted_run",
        "test_checkpoints.py::test_nnx_optimizer_resumes_bit_for_bit_from_orbax",
        "test_stability_benchmark.py::test_every_method_builds_and_takes_a_step_with_the_loss",
        "test_adaptive_parity.py::test_p2_accuracy_against_exact_whole_history_percentile",
        "test_adaptive_parity.py::test_autoclip_p2_matches_published_p2_step_by_step",
        "test_adaptive_edges.py::test_autoclip_window_is_numpy_percentile_of_the_last_w_norms",
    }
)


@pytest.hookimpl(tryfirst=True)  # before the `-m` selection reads the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        file, name = item.path.name, getattr(item, "originalname", item.name)
        if {file, f"{file}::{name}", f"{file}::{item.name}"} & SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
