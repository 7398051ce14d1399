"""What one gradient spike does to a squared-gradient accumulator (Adagrad), and how a clip in
front of it keeps the accumulator intact.

Adagrad keeps, per parameter, the sum of all squared gradients :math:`G_t = G_0 + \\sum g_i^2`
and steps by :math:`-\\eta\\, g_t / \\sqrt{G_t + \\epsilon}`. The sum never forgets: one batch
whose gradient is 1000x the usual adds about a million usual steps' worth to :math:`G`, and the
effective learning rate :math:`\\eta/\\sqrt{G}` of every parameter it touched stays about 1000x
smaller for the rest of training.

A two-layer tanh MLP regresses a fixed random teacher; at one step (a fifth of the way in)
the batch's loss, hence its gradient, is multiplied by 1000, as a corrupted batch would be. Four
optimizers train on the same batches:

* ``optax.adagrad(lr)``: the accumulator takes the spike;
* ``optax.chain(gs.clip_by_global_norm(1.0), optax.adagrad(lr))``: the clip sits *before* the
  accumulator, so the spike enters it at norm 1;
* the seed's optimizer, "accumulate g^2, divide by its root, with momentum and eps":
  ``optax.chain(optax.scale_by_rss(0.1, eps), optax.trace(0.9), optax.scale_by_learning_rate(lr))``,
  without and with the same clip in front.

A run of Adagrad without the spike is the reference. Run it::

    pip install -e ".[examples]" && python examples/accumulator_spike.py

It prints the accumulated sum (all entries of :math:`G`) just before the spike, just after it
and at the end, and the final held-out loss, for each optimizer, and saves a plot of the sum
and the training loss over time (``examples/outputs/accumulator_spike.png``). ``--quick`` is a
short run (for tests). Exits with status 1 if the clipped Adagrad does not end with a lower
loss than the unprotected one.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import gradsafe as gs

matplotlib.use("Agg")  # write files only; no display needed
import matplotlib.pyplot as plt

DIM, HIDDEN, BATCH = 32, 32, 64
SPIKE_SCALE = 1000.0
EPS = 1e-7


def seed_optimizer(lr: float) -> optax.GradientTransformation:
    """Accumulate g^2, divide by its root (eps inside the root), momentum 0.9, learning rate."""
    return optax.chain(
        optax.scale_by_rss(initial_accumulator_value=0.1, eps=EPS),
        optax.trace(decay=0.9),
        optax.scale_by_learning_rate(lr),
    )


def optimizers(lr: float, momentum_lr: float) -> dict[str, optax.GradientTransformation]:
    clip = gs.clip_by_global_norm(1.0)
    return {
        "adagrad": optax.adagrad(lr, eps=EPS),
        "clip -> adagrad": optax.chain(clip, optax.adagrad(lr, eps=EPS)),
        "rss + momentum": seed_optimizer(momentum_lr),
        "clip -> rss + momentum": optax.chain(clip, seed_optimizer(momentum_lr)),
    }


def data(steps: int, spike_step: int | None, seed: int = 0):
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal(DIM).astype(np.float32) / math.sqrt(DIM)
    x = rng.standard_normal((steps, BATCH, DIM)).astype(np.float32)
    y = np.sin(2.0 * x @ teacher) + 0.1 * rng.standard_normal((steps, BATCH)).astype(np.float32)
    scale = np.ones(steps, np.float32)
    if spike_step is not None:
        scale[spike_step] = SPIKE_SCALE
    x_test = rng.standard_normal((1024, DIM)).astype(np.float32)
    params = {
        "w1": rng.standard_normal((DIM, HIDDEN)).astype(np.float32) / math.sqrt(DIM),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": rng.standard_normal((HIDDEN, 1)).astype(np.float32) / math.sqrt(HIDDEN),
        "b2": np.zeros(1, np.float32),
    }
    test = (x_test, np.sin(2.0 * x_test @ teacher))
    return jax.tree.map(jnp.asarray, (params, (x, y, scale), test))


def mse(params, x, y):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean(jnp.square((hidden @ params["w2"] + params["b2"])[:, 0] - y))


def accumulated_sum(opt_state) -> jax.Array:
    """The sum of every entry of the optimizer's sum of squared gradients."""
    found = [
        s.sum_of_squares
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByRssState))
        if isinstance(s, optax.ScaleByRssState)
    ]
    return sum(jnp.sum(leaf) for s in found for leaf in jax.tree.leaves(s))


def train(tx: optax.GradientTransformation, params, batches, test):
    """Train over ``batches``; per step the clean training loss and the accumulated sum."""

    def loss_fn(p, x, y, scale):
        clean = mse(p, x, y)
        return clean * scale, clean

    def step(carry, batch):
        p, state = carry
        (_, clean), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, *batch)
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
        return (p, state), (clean, accumulated_sum(state))

    @jax.jit
    def run(params, batches):
        (p, _), (losses, sums) = jax.lax.scan(step, (params, tx.init(params)), batches)
        return losses, sums, mse(p, *test)

    return run(params, batches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument("--lr", type=float, default=0.1, help="Adagrad's learning rate")
    parser.add_argument("--momentum-lr", type=float, default=0.01, help="with momentum")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "outputs" / "accumulator_spike.png",
    )
    parser.add_argument("--quick", action="store_true", help="a short run (for tests)")
    args = parser.parse_args(argv)
    steps = 300 if args.quick else args.steps
    spike = steps // 5

    params, batches, test = data(steps, spike)
    _, clean_batches, _ = data(steps, None)
    results = {
        "adagrad, no spike": train(optax.adagrad(args.lr, eps=EPS), params, clean_batches, test)
    }
    for name, tx in optimizers(args.lr, args.momentum_lr).items():
        results[name] = train(tx, params, batches, test)

    print(f"one {SPIKE_SCALE:g}x gradient at step {spike} of {steps}; sum of all entries of G:")
    print(f"{'optimizer':<24} {'G before':>10} {'G after':>10} {'G at end':>10} {'final loss':>11}")
    for name, (_, sums, final) in results.items():
        before, after, end = (float(sums[i]) for i in (spike - 1, spike, steps - 1))
        print(f"{name:<24} {before:>10.4g} {after:>10.4g} {end:>10.4g} {float(final):>11.4g}")

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for name, (losses, sums, _) in results.items():
        style = ":" if "no spike" in name else ("-" if name.startswith("clip") else "--")
        top.plot(np.asarray(sums), style, label=name)
        bottom.plot(np.asarray(losses), style, label=name, linewidth=1)
    top.set_yscale("log")
    top.set_ylabel("sum of G (all entries)")
    top.axvline(spike, color="grey", linewidth=0.8)
    bottom.set_yscale("log")
    bottom.set_ylabel("training loss (without the 1000x)")
    bottom.set_xlabel("step")
    top.legend(fontsize=8)
    top.set_title(f"one {SPIKE_SCALE:g}x gradient at step {spike}: the accumulator never forgets")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"saved {args.out}")

    protected = float(results["clip -> adagrad"][2])
    unprotected = float(results["adagrad"][2])
    return 0 if protected < unprotected else 1


if __name__ == "__main__":
    sys.exit(main())
