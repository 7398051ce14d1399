"""The whole training step: gradsafe's guards and clippers against a bare optimizer step.

What a user pays for protection is the time of the jitted training step
``(params, opt_state, grads) -> (params', opt_state')`` with the parameters and the optimizer
state donated (as a Flax/Optax train step does), not the time of one transform on its own.
For every optimizer (Adam, SGD with momentum, Adagrad), tree (one large leaf, many medium
leaves, a model-like mix of a few large and hundreds of small leaves) and gradient norm (10:
every step clips; 0.5: none does), each stack in ``STACKS`` runs alternately with the bare
optimizer step and with its Optax counterpart, ``--repeats`` times each; medians are reported
relative to the bare step. For each compiled program the table also gives:

* ``temp``: the peak temporary memory from ``compiled.memory_analysis()``, relative to the
  bare step's (in MiB above it);
* ``passes``: the bytes that the optimized HLO's kernels read and write, in units of the
  gradient tree's bytes (:func:`hlo_traffic`). A bare Adam step on XLA:CPU moves 10 (read
  and write each moment, then read both with the parameters and write them). It is the
  figure that does not depend on this machine's load.

Last, the compile time of a few programs on trees of ``--compile-leaves`` small leaves.

Run::

    python benchmarks/step.py                        # full run, writes benchmarks/results/
    python benchmarks/step.py --optimizers adam --sizes 64x256K --only stabilize
    python benchmarks/step.py --quick --out-dir /tmp/step    # seconds, for tests

To add a stack, add one :class:`Stack` to ``STACKS``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
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
from _common import command_line, environment, leaf_shape

from gradsafe._numerics import RARE_BRANCH

Transform = optax.GradientTransformation
Wrap = Callable[[Transform], Transform]

OPTIMIZERS: dict[str, Callable[[], Transform]] = {
    "adam": lambda: optax.adam(1e-4),
    "sgd": lambda: optax.sgd(1e-3, momentum=0.9),
    "adagrad": lambda: optax.adagrad(1e-2),
}


def _chain_before(clipper: Callable[[], Transform]) -> Wrap:
    return lambda opt: optax.chain(clipper(), opt)


@dataclass(frozen=True)
class Stack:
    """A gradsafe program around an optimizer and its Optax counterpart (None: no counterpart).

    ``core`` stacks run with every optimizer; the others with Adam only (``--all-stacks``
    runs every stack with every optimizer)."""

    name: str
    gradsafe: Wrap
    optax_name: str | None
    optax: Wrap | None
    core: bool = False


def _aif(opt: Transform) -> Transform:
    return optax.apply_if_finite(opt, 1000)


STACKS: list[Stack] = [
    Stack(
        "chain(gs.clip_by_global_norm(1.0), opt)",
        _chain_before(lambda: gs.clip_by_global_norm(1.0)),
        "chain(optax.clip_by_global_norm(1.0), opt)",
        _chain_before(lambda: optax.clip_by_global_norm(1.0)),
        core=True,
    ),
    Stack(
        "gs.skip_nonfinite(opt)",
        gs.skip_nonfinite,
        "optax.apply_if_finite(opt, 1000)",
        _aif,
        core=True,
    ),
    Stack(
        "gs.skip_nonfinite(opt, check='full')",
        lambda opt: gs.skip_nonfinite(opt, check="full"),
        "optax.apply_if_finite(opt, 1000)",
        _aif,
    ),
    Stack(
        "chain(opt, gs.clip_update_relative(0.1, 1e-2))",
        lambda opt: optax.chain(opt, gs.clip_update_relative(0.1, 1e-2)),
        None,
        None,
        core=True,
    ),
    Stack(
        "gs.stabilize(opt)",
        gs.stabilize,
        "apply_if_finite(chain(optax.clip_by_global_norm(1.0), opt), 1000)",
        lambda opt: _aif(optax.chain(optax.clip_by_global_norm(1.0), opt)),
        core=True,
    ),
    Stack(
        "gs.stabilize(opt, clip='clip_by_global_norm')",
        lambda opt: gs.stabilize(opt, clip="clip_by_global_norm"),
        "apply_if_finite(chain(optax.clip_by_global_norm(1.0), opt), 1000)",
        lambda opt: _aif(optax.chain(optax.clip_by_global_norm(1.0), opt)),
    ),
    Stack(
        "chain(gs.clip_by_value(1.0), opt)",
        _chain_before(lambda: gs.clip_by_value(1.0)),
        "chain(optax.clip(1.0), opt)",
        _chain_before(lambda: optax.clip(1.0)),
    ),
    Stack(
        "chain(gs.adaptive_grad_clip(0.01), opt)",
        _chain_before(lambda: gs.adaptive_grad_clip(0.01)),
        "chain(optax.adaptive_grad_clip(0.01), opt)",
        _chain_before(lambda: optax.adaptive_grad_clip(0.01)),
    ),
    # No Optax counterpart for the rest: compared with gradsafe's global clip in the same run.
    *(
        Stack(
            f"chain(gs.{name}, opt)",
            _chain_before(factory),
            "chain(gs.clip_by_global_norm(1.0), opt)",
            _chain_before(lambda: gs.clip_by_global_norm(1.0)),
        )
        for name, factory in (
            ("clip_by_leaf_norm(1.0)", lambda: gs.clip_by_leaf_norm(1.0)),
            ("zclip()", lambda: gs.zclip()),
            ("autoclip()", lambda: gs.autoclip()),
            ("spike_clip()", lambda: gs.spike_clip()),
        )
    ),
]

FULL_SIZES = "1x16M,64x256K,4x2M+256x4K"
QUICK_SIZES = "2x1K+8x64"
NORMS = (10.0, 0.5)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


# ----------------------------------------------------------------------------------------------
# Counting passes over the data in the optimized HLO
# ----------------------------------------------------------------------------------------------

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f(?:16|32|64)|c(?:64|128))\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s+=\s+(.+?)\s+([a-z][\w\-]*)\((.*)$")
_CALLED = re.compile(
    r"(?:branch_computations=\{|true_computation=|false_computation=|to_apply=|body=)([^},]*"
    r"(?:,\s*%[\w.\-]+)*)"
)
# Instructions that move no data: they name buffers, or build tuples of them.
_FREE = {
    "parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
    "opt-barrier", "partition-id", "replica-id",
}  # fmt: skip


def _array_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape string (a tuple counts each element)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        total += math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dtype]
    return total


def _split_operands(rest: str) -> tuple[str, str]:
    """``"a, b), attrs"`` -> (``"a, b"``, ``", attrs"``): the operand list and what follows."""
    depth = 1
    for index, char in enumerate(rest):
        depth += (char == "(") - (char == ")")
        if depth == 0:
            return rest[:index], rest[index + 1 :]
    return rest, ""


def _is_rare(instructions: list[tuple[str, str, str, list[str], str]]) -> bool:
    """Whether a branch computation is gradsafe's overflow branch (by its name scope)."""
    return any(RARE_BRANCH in attributes for *_, attributes in instructions)


def hlo_traffic(hlo_text: str) -> dict[str, Any]:
    """Bytes read and written by the kernels of an optimized HLO module, and their count.

    Walks the entry computation of ``compiled.as_text()``. Each instruction that moves data (a
    fusion, copy, reduction, custom call...: everything but parameters, constants, tuples and
    bitcasts) counts the bytes of its operands (read) and of its result (written); the
    computations a ``conditional`` may run count as their heaviest branch (an accepted step)
    other than gradsafe's overflow re-check (``RARE_BRANCH``, taken only when a norm
    overflows), a ``call``/``while`` as its body once. A fusion reads an operand once however
    often its fused code uses it, so the total is the traffic of a machine whose caches hold
    no tree.

    Returns:
      ``{"bytes": total, "kernels": instructions that move data, "copies": copy
      instructions}``.
    """
    computations: dict[str, list[tuple[str, str, str, list[str], str]]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if match:
            name, shape, opcode, rest = match.groups()
            operands, attributes = _split_operands(rest)
            names = re.findall(r"%([\w.\-]+)", operands)
            computations[current].append((name, shape, opcode, names, attributes))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    counts = {"kernels": 0, "copies": 0}

    def walk(computation: str) -> int:
        shapes = {name: shape for name, shape, *_ in computations[computation]}
        moved = 0
        for _, shape, opcode, operands, attributes in computations[computation]:
            if opcode in _FREE:
                continue
            if opcode in ("conditional", "call", "while"):
                called = [
                    name
                    for group in _CALLED.findall(attributes)
                    for name in re.findall(r"%?([\w.\-]+)", group)
                    if name in computations
                ]
                # the overflow re-check's branch runs only when a norm overflows
                usual = [name for name in called if not _is_rare(computations[name])]
                moved += max((walk(name) for name in usual or called), default=0)
                continue
            moved += _array_bytes(shape)
            moved += sum(_array_bytes(shapes.get(name, "")) for name in operands)
            counts["kernels"] += 1
            counts["copies"] += opcode == "copy"
        return moved

    return {"bytes": walk(entry), **counts}


# ----------------------------------------------------------------------------------------------
# Trees, programs and timing
# ----------------------------------------------------------------------------------------------


def parse_size(spec: str) -> list[tuple[int, int]]:
    """``"4x2M+256x4K"`` -> [(4 leaves, 2**21 elements), (256, 4096)]; K, M, G are 1024s."""
    groups = []
    for part in spec.strip().upper().split("+"):
        try:
            count, size = part.split("X")
            unit = size[-1] if size[-1] in _UNITS else ""
            groups.append((int(count), int(size[: len(size) - len(unit)]) * _UNITS[unit]))
        except ValueError as error:
            raise ValueError(f"size must look like 64x256K or 4x2M+256x4K, got {spec!r}") from error
    if any(leaves < 1 or elements < 1 for leaves, elements in groups):
        raise ValueError(f"size must have at least one leaf of one element, got {spec!r}")
    return groups


def make_tree(spec: str, seed: int, norm: float | None = None) -> dict[str, jax.Array]:
    """Float32 N(0, 1) leaves of the shape ``spec``, rescaled to global norm ``norm`` if given."""
    shapes = [leaf_shape(e) for count, e in parse_size(spec) for _ in range(count)]
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    tree = {
        f"layer_{i:04d}": jax.random.normal(k, s, jnp.float32)
        for i, (k, s) in enumerate(zip(keys, shapes, strict=True))
    }
    if norm is not None:
        scale = norm / float(optax.global_norm(tree))
        tree = {k: v * jnp.float32(scale) for k, v in tree.items()}
    return tree


def train_step(tx: Transform) -> Callable[..., Any]:
    """``(params, opt_state, grads) -> (params', opt_state')``, params and state donated."""

    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))


@dataclass
class Program:
    """One compiled train step with its own (donated, so private) params and state."""

    compiled: Any
    params: Any
    state: Any
    temp_bytes: int
    traffic: dict[str, Any]
    compile_s: float


def build(tx: Transform, params: Any, grads: Any) -> Program:
    own_params = jax.tree.map(jnp.copy, params)
    state = jax.tree.map(jnp.copy, tx.init(params))  # every leaf in a buffer of its own
    start = time.perf_counter()
    compiled = train_step(tx).lower(own_params, state, grads).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp = int(getattr(memory, "temp_size_in_bytes", 0)) if memory is not None else 0
    return Program(compiled, own_params, state, temp, hlo_traffic(compiled.as_text()), seconds)


def measure(programs: dict[str, Program], grads: Any, repeats: int, warmup: int) -> dict:
    """Seconds per step of each program, called in turn (alternating order) ``repeats`` times."""
    times: dict[str, list[float]] = {name: [] for name in programs}
    for round_index in range(warmup + repeats):
        order = list(programs)[:: -1 if round_index % 2 else 1]
        for name in order:
            program = programs[name]
            start = time.perf_counter()
            program.params, program.state = program.compiled(program.params, program.state, grads)
            jax.block_until_ready(program.params)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _figures(program: Program, seconds: float, bare: Program, bare_s: float, tree_bytes: int):
    return {
        "ms": 1e3 * seconds,
        "x_bare": seconds / bare_s,
        "temp_mib": program.temp_bytes / 2**20,
        "temp_above_bare_mib": (program.temp_bytes - bare.temp_bytes) / 2**20,
        "temp_above_bare_trees": (program.temp_bytes - bare.temp_bytes) / tree_bytes,
        "passes": program.traffic["bytes"] / tree_bytes,
        "kernels": program.traffic["kernels"],
        "copies": program.traffic["copies"],
        "compile_s": program.compile_s,
    }


def run_case(spec, optimizer, norm, stacks, repeats, warmup) -> dict[str, Any]:
    """Every stack on one tree, optimizer and gradient norm."""
    params = make_tree(spec, seed=1)
    grads = make_tree(spec, seed=2, norm=norm)
    tree_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(grads))
    make_opt = OPTIMIZERS[optimizer]
    bare = build(make_opt(), params, grads)
    results: dict[str, Any] = {}
    for stack in stacks:
        programs = {"bare": bare, "gradsafe": build(stack.gradsafe(make_opt()), params, grads)}
        if stack.optax is not None:
            programs["optax"] = build(stack.optax(make_opt()), params, grads)
        seconds = measure(programs, grads, repeats, warmup)
        entry = {
            "bare": _figures(bare, seconds["bare"], bare, seconds["bare"], tree_bytes),
            "gradsafe": _figures(
                programs["gradsafe"], seconds["gradsafe"], bare, seconds["bare"], tree_bytes
            ),
            "optax_name": stack.optax_name,
        }
        if "optax" in programs:
            entry["optax"] = _figures(
                programs["optax"], seconds["optax"], bare, seconds["bare"], tree_bytes
            )
        results[stack.name] = entry
        other = entry.get("optax")
        print(
            f"    {stack.name:<48} {entry['gradsafe']['x_bare']:5.2f}x bare"
            f" ({entry['gradsafe']['passes']:5.1f} passes,"
            f" +{entry['gradsafe']['temp_above_bare_mib']:.0f} MiB)"
            + (
                f" | {stack.optax_name}: {other['x_bare']:5.2f}x ({other['passes']:5.1f} passes)"
                if other
                else ""
            ),
            flush=True,
        )
    return {"tree_bytes": tree_bytes, "leaves": len(grads), "stacks": results}


COMPILE_PROGRAMS: dict[str, Callable[[], Transform]] = {
    "optax.adam(1e-3)": lambda: optax.adam(1e-3),
    "gs.skip_nonfinite(adam)": lambda: gs.skip_nonfinite(optax.adam(1e-3)),
    "optax.apply_if_finite(adam, 1000)": lambda: optax.apply_if_finite(optax.adam(1e-3), 1000),
    "gs.stabilize(adam)": lambda: gs.stabilize(optax.adam(1e-3)),
    "gs.stabilize(adam, limit_updates=False)": lambda: gs.stabilize(
        optax.adam(1e-3), limit_updates=False
    ),
    "apply_if_finite(chain(optax.clip_by_global_norm(1.0), adam), 1000)": lambda: (
        optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), 1000)
    ),
}
COMPILE_LEAF_SHAPE = (32, 32)


def run_compile(leaves: int) -> dict[str, float]:
    """Seconds from ``jit`` to executable (tracing included) of each ``COMPILE_PROGRAMS`` train
    step on ``leaves`` leaves of 32x32 float32."""
    tree = {f"layer_{i:04d}": jnp.zeros(COMPILE_LEAF_SHAPE, jnp.float32) for i in range(leaves)}
    seconds = {}
    for name, factory in COMPILE_PROGRAMS.items():
        tx = factory()
        start = time.perf_counter()
        train_step(tx).lower(tree, tx.init(tree), tree).compile()
        seconds[name] = time.perf_counter() - start
        print(f"    {name}: {seconds[name]:.1f} s", flush=True)
    return seconds


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _cell(figures: dict[str, Any] | None) -> str:
    if figures is None:
        return "-"
    return (
        f"{figures['x_bare']:.2f}x / {figures['passes']:.1f} / "
        f"{figures['temp_above_bare_trees']:+.1f}"
    )


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# The whole training step: gradsafe vs a bare optimizer step and Optax",
        "",
        f"Measured {env['date']} on {env['backend']} ({env['device']}, {env['cpu_count']} CPUs"
        f" visible, {env['machine']}), jax {env['jax']}, optax {env['optax']}, gradsafe"
        f" {env['gradsafe']}. The jitted step `(params, opt_state, grads) -> (params',"
        " opt_state')` with params and state donated; float32 trees; programs alternated,"
        f" median of {report['repeats']} runs after {report['warmup']} warm-up runs."
        f" Produced by `{command_line('step.py', env, report['argv'])}`.",
        "",
        "Each cell: **time relative to the bare step / passes over the tree (bytes moved by the"
        " optimized HLO's kernels, in gradient-tree units) / peak temporary memory above the"
        " bare step, in gradient trees**. Passes and memory come from the compiled program and"
        " do not depend on the machine's load; times on a shared CPU do.",
        "",
        *([report["note"], ""] if report.get("note") else []),
    ]
    for case_name, case in report["cases"].items():
        lines += [
            f"## {case_name} ({case['leaves']} leaves, {case['tree_bytes'] / 2**20:.0f} MiB)",
            "",
            "| gradsafe program | gradsafe | Optax counterpart | Optax |",
            "|---|---:|---|---:|",
        ]
        first = next(iter(case["stacks"].values()), None)
        if first is not None:
            bare = first["bare"]
            lines.append(
                f"| bare step: {bare['ms']:.3g} ms | 1.00x / {bare['passes']:.1f} /"
                f" {bare['temp_mib']:.0f} MiB | | |"
            )
        for name, entry in case["stacks"].items():
            optax_name = f"`{entry['optax_name']}`" if entry["optax_name"] else "(none)"
            lines.append(
                f"| `{name}` | {_cell(entry['gradsafe'])} | {optax_name} |"
                f" {_cell(entry.get('optax'))} |"
            )
        lines.append("")
    compiled = report.get("compile")
    if compiled:
        counts = list(compiled)
        lines += [
            "## Compile time (seconds from `jit` to executable, tracing included; leaves of"
            " 32x32 float32)",
            "",
            "| program | " + " | ".join(f"{n} leaves" for n in counts) + " |",
            "|---|" + "---:|" * len(counts),
        ]
        for name in COMPILE_PROGRAMS:
            cells = [f"{compiled[n][name]:.1f}" for n in counts if name in compiled[n]]
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def save(report: dict[str, Any], out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only", action="append", metavar="TEXT", help="stacks whose name contains TEXT"
    )
    parser.add_argument("--optimizers", nargs="+", choices=sorted(OPTIMIZERS), default=None)
    parser.add_argument(
        "--sizes", default=None, help=f"trees, comma-separated (default {FULL_SIZES})"
    )
    parser.add_argument(
        "--norms", nargs="+", type=float, default=None, help="gradient norms (default 10 0.5)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 11)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument(
        "--all-stacks", action="store_true", help="every stack with every optimizer"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny tree, Adam, core stacks, few repeats"
    )
    parser.add_argument(
        "--compile-leaves", type=int, nargs="*", default=None,
        help="leaf counts of the compile-time section (default 100 1000; quick 8; none: skip)",
    )  # fmt: skip
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="default benchmarks/results; --quick: none"
    )
    parser.add_argument("--stem", default="step", help="file name of the results (default step)")
    args = parser.parse_args(argv)

    stacks = [s for s in STACKS if not args.only or any(t in s.name for t in args.only)]
    if not stacks:
        parser.error(f"no stack matches --only {args.only}; stacks: {[s.name for s in STACKS]}")
    sizes = (args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)).split(",")
    for size in sizes:
        try:
            parse_size(size)
        except ValueError as error:
            parser.error(str(error))
    optimizers = args.optimizers or (["adam"] if args.quick else list(OPTIMIZERS))
    norms = args.norms or ([NORMS[0]] if args.quick else list(NORMS))
    if args.quick and not args.only:  # the stacks every optimizer runs
        stacks = [s for s in stacks if s.core]
    repeats = args.repeats or (3 if args.quick else 11)
    warmup = 1 if args.quick else args.warmup
    compile_leaves = args.compile_leaves
    if compile_leaves is None:
        compile_leaves = [8] if args.quick else [100, 1000]
    out_dir = args.out_dir
    if out_dir is None and not args.quick:
        out_dir = Path(__file__).resolve().parent / "results"

    # A donated buffer that XLA cannot reuse only costs an allocation; no need to warn.
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    report: dict[str, Any] = {
        "environment": environment(),
        "argv": argv,
        "repeats": repeats,
        "warmup": warmup,
        "stacks": [s.name for s in stacks],
        "cases": {},
    }
    print(f"{report['environment']}\nmedian of {repeats} alternated runs per program")
    for size in sizes:
        for optimizer in optimizers:
            here = [s for s in stacks if s.core or optimizer == "adam" or args.all_stacks]
            for norm in norms:
                name = f"{optimizer}, tree {size}, gradient norm {norm:g}"
                if not here:
                    continue
                print(f"  {name}:", flush=True)
                report["cases"][name] = run_case(size, optimizer, norm, here, repeats, warmup)
                if out_dir is not None:  # after every case: an interrupted run keeps its results
                    save(report, out_dir, args.stem)
    if compile_leaves:
        report["compile"] = {}
        for leaves in compile_leaves:
            print(f"  compile time, {leaves} leaves:", flush=True)
            report["compile"][str(leaves)] = run_compile(leaves)
            if out_dir is not None:
                save(report, out_dir, args.stem)
    print()
    print(markdown(report))
    if out_dir is not None:
        print(f"results written to {out_dir / (args.stem + '.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
