"""The bar for a guarded Adam step on this backend: hand-written programs, no library code.

``benchmarks/step.py`` measures gradsafe's guards inside a donated train step. This script
measures what the same guarantees cost when written by hand, to tell which part of the cost
is the library's and which is the backend's. Every program is the jitted step ``(params, mu,
nu, grads) -> (params', mu', nu')`` of Adam (lr 1e-4) with params and moments donated:

* ``bare``: Adam, unguarded.
* ``cond(step)``: refuse a step whose gradient is not finite (or whose squared norm
  overflows) with one ``lax.cond`` around the *whole* step, the parameter update included.
  An Optax transform cannot do this: it returns the update and ``optax.apply_updates`` adds
  it outside.
* ``cond(update)``: the same ``lax.cond`` around the optimizer's update only, the parameter
  update outside: what a guard written as a gradient transformation can do.
* ``where``: no ``lax.cond``: run the step, then select the old or new parameters and moments
  entry by entry.
* ``cond(step) + clip + limit`` and ``cond(update) + clip + limit``: the guard with a global-norm
  clip before Adam and a per-tensor relative update limit after it (``|u_j| <= 0.1 |w_j| +
  0.01``), the guarantees of ``gs.stabilize`` with a fixed clip. (Its limit takes every
  bound as it is, where ``gs.clip_update_relative`` lets an entry with a non-finite bound,
  a NaN or Inf parameter, impose none: a test fewer per entry, so a slightly stricter bar.)

For each: the time relative to ``bare`` (programs alternated, median), the passes over the
tree in the optimized HLO (``hlo_traffic`` of ``benchmarks/step.py``) and the temporary memory
above ``bare``::

    python benchmarks/guard_floor.py                     # 1x4M and 16x256K float32 trees
    python benchmarks/guard_floor.py --sizes 1x1M --repeats 5

Results: ``benchmarks/results/guard_floor.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

# The scripts run as files and are loaded by path in the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, environment
from step import hlo_traffic, make_tree

LR, B1, B2, EPS = 1e-4, 0.9, 0.999, 1e-8
RELATIVE, ABSOLUTE, MAX_NORM = 0.1, 1e-2, 1.0
Tree = dict[str, jax.Array]


def _tree_map(fn: Callable[..., jax.Array], *trees: Tree) -> Tree:
    return {k: fn(*(t[k] for t in trees)) for k in trees[0]}


def _accept(grads: Tree) -> jax.Array:
    """Finite entries and a finite squared norm (scaled by 2**-64, as gradsafe's guard)."""
    total = sum(jnp.sum(jnp.square(g * 2.0**-64)) for g in grads.values())
    return total < jnp.finfo(jnp.float32).max * 2.0**-128


def _moments(mu: Tree, nu: Tree, grads: Tree) -> tuple[Tree, Tree]:
    mu = _tree_map(lambda m, g: B1 * m + (1 - B1) * g, mu, grads)
    nu = _tree_map(lambda v, g: B2 * v + (1 - B2) * g * g, nu, grads)
    return mu, nu


def _direction(mu: Tree, nu: Tree) -> Tree:
    return _tree_map(lambda m, v: -LR * m / (jnp.sqrt(v) + EPS), mu, nu)


def _clip(grads: Tree) -> Tree:
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in grads.values()))
    scale = jnp.where(norm > MAX_NORM, MAX_NORM / norm, 1.0)
    return _tree_map(lambda g: g * scale, grads)


def _limit(updates: Tree, params: Tree) -> Tree:
    def one(u: jax.Array, w: jax.Array) -> jax.Array:
        bound = RELATIVE * jnp.abs(w) + ABSOLUTE
        return u * jnp.minimum(1.0, jnp.min(bound / jnp.maximum(jnp.abs(u), 1e-30)))

    return _tree_map(one, updates, params)


def _update(mu: Tree, nu: Tree, grads: Tree, params: Tree, full: bool):
    """The optimizer's update and new moments (clip before and limit after when ``full``)."""
    grads = _clip(grads) if full else grads
    mu, nu = _moments(mu, nu, grads)
    updates = _direction(mu, nu)
    return (_limit(updates, params) if full else updates), mu, nu


def _add(params: Tree, updates: Tree) -> Tree:
    return _tree_map(jnp.add, params, updates)


def bare(params, mu, nu, grads):
    updates, mu, nu = _update(mu, nu, grads, params, full=False)
    return _add(params, updates), mu, nu


def _cond_step(full: bool):
    def step(params, mu, nu, grads):
        def run(params, mu, nu, grads):
            updates, mu, nu = _update(mu, nu, grads, params, full)
            return _add(params, updates), mu, nu

        def refuse(params, mu, nu, grads):
            return params, mu, nu

        return jax.lax.cond(_accept(grads), run, refuse, params, mu, nu, grads)

    return step


def _cond_update(full: bool):
    def step(params, mu, nu, grads):
        def run(mu, nu, grads, params):
            return _update(mu, nu, grads, params, full)

        def refuse(mu, nu, grads, params):
            return _tree_map(jnp.zeros_like, grads), mu, nu

        updates, mu, nu = jax.lax.cond(_accept(grads), run, refuse, mu, nu, grads, params)
        return _add(params, updates), mu, nu

    return step


def where(params, mu, nu, grads):
    ok = _accept(grads)
    new = bare(params, mu, nu, grads)

    def keep(fresh: Tree, old: Tree) -> Tree:
        return _tree_map(lambda a, b: jnp.where(ok, a, b), fresh, old)

    return tuple(keep(a, b) for a, b in zip(new, (params, mu, nu), strict=True))


PROGRAMS: dict[str, Callable[..., Any]] = {
    "bare": bare,
    "cond(step)": _cond_step(full=False),
    "cond(update)": _cond_update(full=False),
    "where": where,
    "cond(step) + clip + limit": _cond_step(full=True),
    "cond(update) + clip + limit": _cond_update(full=True),
}


def run_case(size: str, repeats: int, warmup: int) -> dict[str, Any]:
    params, grads = make_tree(size, 0), make_tree(size, 1, norm=10.0)
    tree_bytes = sum(x.nbytes for x in grads.values())
    programs = {}
    for name, fn in PROGRAMS.items():
        state = [jax.tree.map(jnp.copy, params)] + [_tree_map(jnp.zeros_like, params)] * 2
        state = [jax.tree.map(jnp.copy, s) for s in state]  # buffers of their own
        compiled = jax.jit(fn, donate_argnums=(0, 1, 2)).lower(*state, grads).compile()
        memory = compiled.memory_analysis()
        programs[name] = {
            "compiled": compiled,
            "state": state,
            "temp": int(getattr(memory, "temp_size_in_bytes", 0)) if memory else 0,
            "passes": hlo_traffic(compiled.as_text())["bytes"] / tree_bytes,
        }
    times: dict[str, list[float]] = {name: [] for name in programs}
    for round_index in range(warmup + repeats):
        for name in list(programs)[:: -1 if round_index % 2 else 1]:
            program = programs[name]
            start = time.perf_counter()
            program["state"] = list(program["compiled"](*program["state"], grads))
            jax.block_until_ready(program["state"])
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["bare"])
    return {
        name: {
            "ms": 1e3 * statistics.median(times[name]),
            "x_bare": statistics.median(times[name]) / base,
            "passes": program["passes"],
            "temp_above_bare_trees": (program["temp"] - programs["bare"]["temp"]) / tree_bytes,
        }
        for name, program in programs.items()
    }


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# The bar for a guarded Adam step: hand-written programs",
        "",
        f"Measured {env['date']} on {env['backend']} ({env['cpu_count']} CPUs visible), jax"
        f" {env['jax']}. Produced by `{command_line('guard_floor.py', env, report['argv'])}`;"
        f" median of {report['repeats']} alternated runs. Each cell: time relative to"
        " `bare` / passes over the tree in the optimized HLO / temporary memory above `bare`"
        " in gradient trees.",
        "",
    ]
    sizes = list(report["cases"])
    lines += ["| program | " + " | ".join(sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for name in PROGRAMS:
        cells = []
        for size in sizes:
            entry = report["cases"][size][name]
            cells.append(
                f"{entry['x_bare']:.2f}x / {entry['passes']:.1f} /"
                f" {entry['temp_above_bare_trees']:+.1f}"
            )
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1x4M,16x256K", help="trees, comma-separated")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    report: dict[str, Any] = {
        "environment": environment(),
        "argv": argv,
        "repeats": args.repeats,
        "cases": {},
    }
    for size in args.sizes.split(","):
        print(f"  {size}", flush=True)
        report["cases"][size] = run_case(size, args.repeats, args.warmup)
    page = markdown(report)
    print(page)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "guard_floor.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / "guard_floor.md").write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
