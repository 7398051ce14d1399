"""Step time of gradsafe's clippers against their Optax counterparts, and the memory bound.

Each clipper's ``update`` is jitted with the gradient and state buffers donated
(``donate_argnums``), as in a real training step: the output then reuses the input's memory,
so the time measured is
the arithmetic and memory traffic of the transform, not the allocation of a fresh output tree.
The output of each call is fed back as the next call's gradient, so one tree stays alive.

For every tree shape, the gradsafe transform, its baseline and a donated copy (``x * s`` with a
run-time ``s = 1``) run alternately, ``--repeats`` times each; the medians are reported. The
copy reads and writes the tree once, which gives the memory bandwidth of this machine in this
run; a transform that must move ``k`` bytes per gradient byte cannot be faster than
``k * tree_bytes / bandwidth`` (the memory bound), and ``bound %`` says how close it gets
(100% = at the bound). Last, the compile time of ``COMPILE_PAIRS`` (a gradsafe training
step and its nearest Optax equivalent) on a tree of ``--compile-leaves`` small leaves.

Run::

    python benchmarks/overhead.py                      # full run, writes benchmarks/results/
    python benchmarks/overhead.py --only clip_by_global_norm --sizes 64x1M
    python benchmarks/overhead.py --quick --out-dir /tmp/overhead   # seconds, for tests

To add a transform, add one :class:`Entry` to ``ENTRIES``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import gradsafe as gs

# The scripts run as files (python benchmarks/step.py) and are loaded by path in the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, leaf_shape

Factory = Callable[[], optax.GradientTransformation]


@dataclass(frozen=True)
class Entry:
    """One comparison: a gradsafe transform against a baseline on the same gradients.

    ``traffic`` is the number of tree-sized memory passes the transform needs at least
    (reads plus writes, in units of the gradient tree's bytes): 2 for an element-wise map,
    3 for a norm followed by a scale, 4 when the parameters are read as well.

    Trees of more than ``MANY_LEAVES`` leaves run only the entries with ``many_leaves`` (and
    any entry named with ``--only``): XLA needs minutes on a 2-core CPU to compile one
    program over 4096 leaves (about 6 to 8 minutes for ``optax.clip_by_global_norm`` there).
    """

    name: str
    gradsafe: Factory
    baseline: Factory
    baseline_name: str
    traffic: int
    needs_params: bool = False
    many_leaves: bool = False  # also run on trees of more than MANY_LEAVES leaves


ENTRIES: list[Entry] = [
    Entry(
        "clip_by_global_norm",
        lambda: gs.clip_by_global_norm(1.0),
        lambda: optax.clip_by_global_norm(1.0),
        "optax.clip_by_global_norm",
        traffic=3,
        many_leaves=True,
    ),
    Entry(
        "clip_by_value",
        lambda: gs.clip_by_value(1.0),
        lambda: optax.clip(1.0),
        "optax.clip",
        traffic=2,
    ),
    Entry(
        "clip_by_block_rms",
        lambda: gs.clip_by_block_rms(1.0),
        lambda: optax.clip_by_block_rms(1.0),
        "optax.clip_by_block_rms",
        traffic=3,
    ),
    Entry(
        "adaptive_grad_clip",
        lambda: gs.adaptive_grad_clip(0.01),
        lambda: optax.adaptive_grad_clip(0.01),
        "optax.adaptive_grad_clip",
        traffic=4,
        needs_params=True,
    ),
    # No Optax counterpart: compared with gradsafe's own global-norm clipping.
    Entry(
        "clip_by_leaf_norm",
        lambda: gs.clip_by_leaf_norm(1.0),
        lambda: gs.clip_by_global_norm(1.0),
        "gs.clip_by_global_norm",
        traffic=3,
    ),
    # Adaptive clippers (no Optax counterpart): the cost over gradsafe's fixed global clipping.
    *(
        Entry(name, factory, lambda: gs.clip_by_global_norm(1.0), "gs.clip_by_global_norm", 3)
        for name, factory in (
            ("zclip", lambda: gs.zclip()),
            ("autoclip", lambda: gs.autoclip()),
            ("autoclip_window", lambda: gs.autoclip(window=1000)),
            ("adagc_global", lambda: gs.adagc(scope="global")),
            ("adagc_leaf", lambda: gs.adagc()),
        )
    ),
    # Reads and writes its per-parameter EMA of g² as well: more traffic by design.
    Entry(
        "spike_clip",
        lambda: gs.spike_clip(),
        lambda: gs.clip_by_global_norm(1.0),
        "gs.clip_by_global_norm",
        traffic=5,
    ),
]

FULL_SIZES = "1x64M,64x1M,1024x64K,4096x1K"
MANY_LEAVES = 1024


@dataclass(frozen=True)
class CompilePair:
    """A gradsafe training-step program and its nearest Optax equivalent, compiled on a tree
    of many small leaves: the time from ``jit`` to an executable (tracing included)."""

    name: str
    gradsafe: Factory
    baseline: Factory
    baseline_name: str


COMPILE_PAIRS: list[CompilePair] = [
    CompilePair(
        "optax.chain(gs.clip_by_global_norm(1.0), optax.adam(1e-3))",
        lambda: optax.chain(gs.clip_by_global_norm(1.0), optax.adam(1e-3)),
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
        "optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))",
    ),
    # Not the same work: the guard also checks the update and the new state, and stabilize
    # adds ZClip and the update limit. The nearest one-line Optax stack.
    CompilePair(
        "gs.stabilize(optax.adam(1e-3))",
        lambda: gs.stabilize(optax.adam(1e-3)),
        lambda: optax.apply_if_finite(
            optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), 100
        ),
        "optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)))",
    ),
]
COMPILE_LEAF_SHAPE = (32, 32)
QUICK_SIZES = "4x16K"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


# ----------------------------------------------------------------------------------------------
# Trees and timing
# ----------------------------------------------------------------------------------------------


def parse_size(spec: str) -> tuple[int, int]:
    """``"64x1M"`` -> (64 leaves, 2**20 elements per leaf); K, M, G are powers of 1024."""
    try:
        count, size = spec.strip().upper().split("X")
        unit = size[-1] if size[-1] in _UNITS else ""
        elements = int(size[: len(size) - len(unit)]) * _UNITS[unit]
        leaves = int(count)
    except ValueError as error:
        raise ValueError(f"size must look like 64x1M, got {spec!r}") from error
    if leaves < 1 or elements < 1:
        raise ValueError(f"size must have at least one leaf of one element, got {spec!r}")
    return leaves, elements


def make_tree(leaves: int, elements: int, seed: int) -> dict[str, jax.Array]:
    """A dict of ``leaves`` float32 arrays of ``elements`` N(0, 1) values each."""
    shape = leaf_shape(elements)
    keys = jax.random.split(jax.random.key(seed), leaves)
    make = jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32))
    return {f"layer_{i:04d}": make(k) for i, k in enumerate(keys)}


def compile_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
    """``(grads, state, params) -> (updates, state)`` jitted with ``grads`` and ``state`` donated,
    as in a training step that donates its optimizer state (it matters for per-parameter state)."""

    def step(grads, state, params):
        return tx.update(grads, state, params)

    return jax.jit(step, donate_argnums=(0, 1))


def own_buffers(state: Any) -> Any:
    """``state`` with every leaf in a buffer of its own: a state may hold one array in several
    fields, and a buffer cannot be donated twice in one call."""
    return jax.tree.map(jnp.copy, state)


def compile_copy() -> Callable[..., Any]:
    """A donated ``x * s`` on every leaf, ``s = 1`` known only at run time (XLA would remove a
    constant ``x * 1``): one read and one write of the tree. ``s`` rides in the state slot."""

    def copy(grads, scale, params):
        del params
        return jax.tree.map(lambda x: x * scale.astype(x.dtype), grads), scale

    return jax.jit(copy, donate_argnums=(0, 1))


def measure(
    functions: dict[str, tuple[Callable[..., Any], Any]],
    grads: Any,
    params: Any,
    repeats: int,
    warmup: int,
) -> tuple[dict[str, list[float]], Any]:
    """Seconds per call of each function, called in turn (alternating) ``repeats`` times.

    ``functions`` maps a name to ``(jitted step, optimizer state)``. Every call's output is the
    next call's input, so the donated buffers are reused throughout; the last output is returned
    with the times (the input tree has been donated away).
    """
    times: dict[str, list[float]] = {name: [] for name in functions}
    states = {name: state for name, (_, state) in functions.items()}
    for round_index in range(warmup + repeats):
        order = list(functions)
        if round_index % 2:  # alternate who goes first, so neither always follows the other
            order.reverse()
        for name in order:
            fn = functions[name][0]
            start = time.perf_counter()
            grads, states[name] = fn(grads, states[name], params)
            jax.block_until_ready(grads)
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return times, grads


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------


def run_size(spec: str, entries: list[Entry], repeats: int, warmup: int) -> dict[str, Any]:
    """Every entry on one tree shape; returns that shape's results."""
    leaves, elements = parse_size(spec)
    grads = make_tree(leaves, elements, seed=0)
    tree_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(grads))
    need_params = any(e.needs_params for e in entries)
    params = make_tree(leaves, elements, seed=1) if need_params else None

    copy = compile_copy()
    results: dict[str, Any] = {}
    copy_times: list[float] = []
    for entry in entries:
        gradsafe_tx, baseline_tx = entry.gradsafe(), entry.baseline()
        functions = {
            "gradsafe": (compile_step(gradsafe_tx), own_buffers(gradsafe_tx.init(grads))),
            "baseline": (compile_step(baseline_tx), own_buffers(baseline_tx.init(grads))),
            "copy": (copy, jnp.ones((), jnp.float32)),
        }
        start = time.perf_counter()
        entry_params = params if entry.needs_params else None
        times, grads = measure(functions, grads, entry_params, repeats, warmup)
        wall = time.perf_counter() - start
        copy_times.extend(times["copy"])
        gs_time = statistics.median(times["gradsafe"])
        base_time = statistics.median(times["baseline"])
        copy_time = statistics.median(times["copy"])
        bandwidth = 2 * tree_bytes / copy_time
        bound = entry.traffic * tree_bytes / bandwidth
        results[entry.name] = {
            "baseline_name": entry.baseline_name,
            "gradsafe_ms": 1e3 * gs_time,
            "baseline_ms": 1e3 * base_time,
            "ratio": gs_time / base_time,
            "copy_ms": 1e3 * copy_time,
            "traffic_passes": entry.traffic,
            "bound_ms": 1e3 * bound,
            "gradsafe_bound_fraction": bound / gs_time,
            "baseline_bound_fraction": bound / base_time,
            "gradsafe_spread_ms": [1e3 * min(times["gradsafe"]), 1e3 * max(times["gradsafe"])],
            "baseline_spread_ms": [1e3 * min(times["baseline"]), 1e3 * max(times["baseline"])],
            "seconds": wall,
        }
        print(
            f"  {entry.name:<22} gradsafe {1e3 * gs_time:9.3f} ms  {entry.baseline_name:<27}"
            f" {1e3 * base_time:9.3f} ms  ratio {gs_time / base_time:5.2f}x  "
            f"bound {1e3 * bound:8.3f} ms (gradsafe {100 * bound / gs_time:5.1f}%, "
            f"baseline {100 * bound / base_time:5.1f}%)",
            flush=True,
        )
    copy_time = statistics.median(copy_times)
    return {
        "leaves": leaves,
        "elements_per_leaf": elements,
        "leaf_shape": list(leaf_shape(elements)),
        "tree_bytes": tree_bytes,
        "copy_ms": 1e3 * copy_time,
        "copy_bandwidth_gb_s": 2 * tree_bytes / copy_time / 1e9,
        "entries": results,
    }


def compile_seconds(tx: optax.GradientTransformation, tree: Any) -> float:
    """Seconds from a fresh ``jit`` of the donated training step to its executable."""
    start = time.perf_counter()
    compile_step(tx).lower(tree, own_buffers(tx.init(tree)), tree).compile()
    return time.perf_counter() - start


def run_compile(leaves: int, repeats: int) -> dict[str, Any]:
    """Compile time of every ``COMPILE_PAIRS`` entry on a tree of ``leaves`` small leaves,
    gradsafe and baseline alternated ``repeats`` times; medians."""
    tree = {f"layer_{i:04d}": jnp.zeros(COMPILE_LEAF_SHAPE, jnp.float32) for i in range(leaves)}
    results: dict[str, Any] = {}
    for pair in COMPILE_PAIRS:
        times: dict[str, list[float]] = {"gradsafe": [], "baseline": []}
        for index in range(repeats):
            order = ["gradsafe", "baseline"][:: -1 if index % 2 else 1]
            for side in order:
                times[side].append(compile_seconds(getattr(pair, side)(), tree))
        gs_s, base_s = (statistics.median(times[side]) for side in ("gradsafe", "baseline"))
        results[pair.name] = {
            "baseline_name": pair.baseline_name,
            "gradsafe_s": gs_s,
            "baseline_s": base_s,
            "ratio": gs_s / base_s,
        }
        print(
            f"  compile {pair.name}: {gs_s:.1f} s; {pair.baseline_name}: {base_s:.1f} s;"
            f" ratio {gs_s / base_s:.2f}x",
            flush=True,
        )
    return {"leaves": leaves, "leaf_shape": list(COMPILE_LEAF_SHAPE), "pairs": results}


def markdown(report: dict[str, Any]) -> str:
    """The results as a markdown page: one table of ratios, one of memory-bound fractions."""
    env = report["environment"]
    sizes = list(report["sizes"])
    names = [n for n in report["entries"] if any(n in report["sizes"][s]["entries"] for s in sizes)]
    lines = [
        "# Overhead: gradsafe clippers vs their Optax counterparts",
        "",
        f"Measured {env['date']} on {env['backend']} ({env['device']}, {env['cpu_count']} CPUs"
        f" visible, {env['machine']}), jax {env['jax']}, optax {env['optax']}, gradsafe"
        f" {env['gradsafe']}. Float32 trees, gradient and state buffers donated, implementations"
        f" alternated, median of {report['repeats']} runs after {report['warmup']} warm-up"
        " runs. Produced by `python benchmarks/overhead.py`.",
        "",
        *([report["note"], ""] if report.get("note") else []),
        "## Step time ratio (gradsafe / baseline; < 1 means gradsafe is faster)",
        "",
        "| transform | baseline | " + " | ".join(sizes) + " |",
        "|---|---|" + "---:|" * len(sizes),
    ]
    for name in names:
        cells = []
        baseline = ""
        for size in sizes:
            result = report["sizes"][size]["entries"].get(name)
            if result is None:
                cells.append("-")
                continue
            baseline = result["baseline_name"]
            cells.append(
                f"{result['ratio']:.2f}x ({result['gradsafe_ms']:.3g} / "
                f"{result['baseline_ms']:.3g} ms)"
            )
        lines.append(f"| `{name}` | `{baseline}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Memory bound (bound time / measured time; 100% = at the copy bandwidth)",
        "",
        "The bound is `passes * tree bytes / bandwidth`, with the bandwidth from a donated"
        " `x * s` (`s = 1` given at run time; one read and one write of the tree) timed"
        " alternately with the transforms;"
        " `passes` is the least number of tree-sized reads and writes the transform needs"
        " (2: element-wise; 3: a norm, then a scale; 4: AGC, which also reads the parameters).",
        "",
        "| transform | passes | " + " | ".join(f"{s} gradsafe / baseline" for s in sizes) + " |",
        "|---|---:|" + "---:|" * len(sizes),
    ]
    for name in names:
        cells = []
        passes = ""
        for size in sizes:
            result = report["sizes"][size]["entries"].get(name)
            if result is None:
                cells.append("-")
                continue
            passes = str(result["traffic_passes"])
            cells.append(
                f"{100 * result['gradsafe_bound_fraction']:.0f}% / "
                f"{100 * result['baseline_bound_fraction']:.0f}%"
            )
        lines.append(f"| `{name}` | {passes} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| tree | bytes | copy (ms) | copy bandwidth (GB/s) |",
        "|---|---:|---:|---:|",
    ]
    for size in sizes:
        info = report["sizes"][size]
        lines.append(
            f"| {size} | {info['tree_bytes'] / 2**20:.0f} MiB | {info['copy_ms']:.3g} |"
            f" {info['copy_bandwidth_gb_s']:.1f} |"
        )
    compiled = report.get("compile")
    if compiled:
        shape = "x".join(map(str, compiled["leaf_shape"]))
        lines += [
            "",
            f"## Compile time ({compiled['leaves']} leaves of {shape} float32; seconds from"
            " `jit` to executable, tracing included, median of"
            f" {report['compile_repeats']} alternated)",
            "",
            "| gradsafe program | Optax program | gradsafe (s) | Optax (s) | ratio |",
            "|---|---|---:|---:|---:|",
        ]
        for name, result in compiled["pairs"].items():
            lines.append(
                f"| `{name}` | `{result['baseline_name']}` | {result['gradsafe_s']:.1f} |"
                f" {result['baseline_s']:.1f} | {result['ratio']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this entry")
    parser.add_argument("--sizes", default=None, help=f"tree shapes (default {FULL_SIZES})")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 21)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--quick", action="store_true", help="small trees, few repeats")
    parser.add_argument(
        "--compile-leaves",
        type=int,
        default=None,
        help="leaves of the compile-time tree (default 1000, quick 8; 0 skips it)",
    )
    parser.add_argument(
        "--compile-repeats", type=int, default=1, help="compilations per program (median)"
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where to write overhead.json and .md (default benchmarks/results; --quick: none)",
    )
    args = parser.parse_args(argv)

    known = {e.name: e for e in ENTRIES}
    unknown = [n for n in args.only or [] if n not in known]
    if unknown:
        parser.error(f"unknown --only {unknown}; choose from {sorted(known)}")
    entries = [e for e in ENTRIES if not args.only or e.name in args.only]
    sizes = (args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)).split(",")
    for size in sizes:
        try:
            parse_size(size)
        except ValueError as error:
            parser.error(str(error))
    repeats = args.repeats or (3 if args.quick else 21)
    warmup = 1 if args.quick else args.warmup
    out_dir = args.out_dir
    if out_dir is None and not args.quick:
        out_dir = Path(__file__).resolve().parent / "results"

    # A donated buffer that XLA cannot reuse only costs an allocation; no need to warn.
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    report: dict[str, Any] = {
        "environment": environment(),
        "repeats": repeats,
        "warmup": warmup,
        "entries": [e.name for e in entries],
        "sizes": {},
        "compile_repeats": args.compile_repeats,
    }
    print(f"{report['environment']}\nmedian of {repeats} alternated runs per implementation")
    for size in sizes:
        print(f"tree {size}:", flush=True)
        leaves, _ = parse_size(size)
        here = [e for e in entries if args.only or e.many_leaves or leaves <= MANY_LEAVES]
        report["sizes"][size] = run_size(size, here, repeats, warmup)
        info = report["sizes"][size]
        print(f"  copy {info['copy_ms']:.3f} ms = {info['copy_bandwidth_gb_s']:.1f} GB/s")
        if out_dir is not None:  # after every tree, so a long run interrupted keeps its results
            save(report, out_dir)

    compile_leaves = args.compile_leaves
    if compile_leaves is None:
        compile_leaves = 8 if args.quick else 1000
    if compile_leaves > 0:
        print(f"compile time, {compile_leaves} leaves:", flush=True)
        report["compile"] = run_compile(compile_leaves, args.compile_repeats)
        if out_dir is not None:
            save(report, out_dir)

    print()
    print(markdown(report))
    if out_dir is not None:
        print(f"results written to {out_dir / 'overhead.json'} and {out_dir / 'overhead.md'}")
    return 0


def save(report: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "overhead.md").write_text(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
