"""Recover a sparse weight vector with ``gs.prox_l1`` (proximal gradient descent, ISTA).

Data: ``y = X w* + noise`` with 100 samples, 200 features and only 5 non-zero entries in
``w*``: fewer equations than unknowns, so least squares alone cannot find ``w*``. The lasso
objective is ``0.5 * mean((X w - y)**2) + l1reg * ||w||_1``. Three optimizers
run the same full-batch steps:

* ``optax.sgd(lr)``: plain least squares, no penalty: it fits the data with a dense vector
  (every weight non-zero, the true ones badly underestimated);
* ``optax.chain(gs.add_l1(l1reg), optax.sgd(lr))``: the L1 *subgradient* added to the gradient:
  the small weights shrink but oscillate around zero and are never exactly zero;
* ``optax.chain(optax.sgd(lr), gs.prox_l1(l1reg, lr))``: the L1 *proximal step*
  (soft-thresholding) after the gradient step, which is ISTA: weights below the threshold
  become exactly zero, and the non-zero pattern is the true support.

Run it::

    pip install -e ".[examples]" && python examples/sparse_regression.py

It prints how many weights each method leaves non-zero and whether the support was recovered,
and saves a plot of the true and estimated weights (``sparse_regression.png``). ``--quick``
makes it tiny (for tests). Exits with status 1 if ``prox_l1`` misses the true support.
"""

from __future__ import annotations

import argparse
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

SAMPLES, FEATURES, NONZEROS, NOISE = 100, 200, 5, 0.1  # fewer samples than features


def make_problem(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Design matrix, targets and the sparse true weights."""
    x_key, support_key, value_key, noise_key = jax.random.split(key, 4)
    X = jax.random.normal(x_key, (SAMPLES, FEATURES), jnp.float32)
    support = jax.random.choice(support_key, FEATURES, (NONZEROS,), replace=False)
    values = jax.random.uniform(value_key, (NONZEROS,), jnp.float32, 1.0, 3.0)
    signs = jnp.where(jnp.arange(NONZEROS) % 2 == 0, 1.0, -1.0).astype(jnp.float32)
    w_true = jnp.zeros(FEATURES, jnp.float32).at[support].set(signs * values)
    y = X @ w_true + NOISE * jax.random.normal(noise_key, (SAMPLES,), jnp.float32)
    return X, y, w_true


def fit(tx: optax.GradientTransformation, X: jax.Array, y: jax.Array, steps: int):
    """Full-batch steps from zero; returns the weights and the non-zero count per step."""

    def loss(w):
        return 0.5 * jnp.mean(jnp.square(X @ w - y))

    def step(carry, _):
        w, state = carry
        updates, state = tx.update(jax.grad(loss)(w), state, w)
        w = optax.apply_updates(w, updates)
        return (w, state), jnp.sum(w != 0)

    w0 = jnp.zeros(FEATURES, jnp.float32)
    (w, state), nonzeros = jax.jit(lambda: jax.lax.scan(step, (w0, tx.init(w0)), None, steps))()
    return w, nonzeros, state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="gradient steps")
    parser.add_argument("--l1reg", type=float, default=0.1, help="L1 penalty weight")
    parser.add_argument("--out", type=Path, default=Path("sparse_regression.png"))
    parser.add_argument("--quick", action="store_true", help="a tiny run (for tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 300
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.l1reg < 0:
        parser.error("--l1reg must be >= 0")

    X, y, w_true = make_problem(jax.random.key(0))
    # Step size 1/L, with L the largest eigenvalue of the loss's Hessian X^T X / n.
    lipschitz = float(jnp.linalg.eigvalsh(X.T @ X / SAMPLES)[-1])
    lr = 1.0 / lipschitz

    methods = {
        "sgd (no penalty)": optax.sgd(lr),
        "add_l1 + sgd (subgradient)": optax.chain(gs.add_l1(args.l1reg), optax.sgd(lr)),
        "sgd + prox_l1 (ISTA)": optax.chain(optax.sgd(lr), gs.prox_l1(args.l1reg, lr)),
    }
    true_support = np.asarray(w_true != 0)
    results = {}
    print(f"{'method':28s} {'non-zero weights':>17s} {'support recovered':>18s} {'max error':>10s}")
    for name, tx in methods.items():
        w, nonzeros, state = fit(tx, X, y, args.steps)
        w = np.asarray(w)
        recovered = bool(np.array_equal(w != 0, true_support))
        error = float(np.max(np.abs(w - np.asarray(w_true))))
        results[name] = (w, np.asarray(nonzeros), recovered)
        print(f"{name:28s} {int(np.sum(w != 0)):17d} {recovered!s:>18s} {error:10.3f}")
    prox_stats = gs.metrics(state)  # the last method's state: prox_l1's figures
    print(
        f"prox_l1 threshold lr*l1reg = {float(prox_stats['prox_l1/threshold']):.4f}, "
        f"zero fraction {float(prox_stats['prox_l1/zero_fraction']):.2f}"
    )

    fig, (ax_w, ax_nz) = plt.subplots(1, 2, figsize=(12, 4))
    index = np.arange(FEATURES)
    ax_w.vlines(index, 0, np.asarray(w_true), color="k", lw=1.5, label="true weights")
    # Distinct markers and line styles: two runs can leave the same count (all 200 weights
    # non-zero) and their lines would otherwise hide each other.
    looks = [("C0", "o", "-"), ("C1", "x", "--"), ("C2", "s", ":")]
    for order, ((name, (w, _, _)), (color, marker, _)) in enumerate(
        zip(results.items(), looks, strict=True)
    ):
        # Hollow squares under the others: the crosses drawn over them stay visible.
        colors = {"color": color} if marker != "s" else {"facecolors": "none", "edgecolors": color}
        zorder = 2 if marker == "s" else 5 - order
        ax_w.scatter(index, w, s=24, marker=marker, label=name, zorder=zorder, **colors)
    ax_w.set(xlabel="feature", ylabel="weight", title="true vs estimated weights")
    ax_w.legend(fontsize=8)
    every = max(1, args.steps // 12)
    for (name, (_, nonzeros, _)), (color, marker, style) in zip(
        results.items(), looks, strict=True
    ):
        ax_nz.plot(
            nonzeros,
            color=color,
            ls=style,
            lw=1.8,
            marker=marker,
            markevery=(looks.index((color, marker, style)) * every // 3, every),
            label=f"{name}: {int(nonzeros[-1])} at the end",
        )
    ax_nz.axhline(NONZEROS, color="k", ls="--", lw=0.8, label="true non-zeros")
    ax_nz.set(xlabel="step", ylabel="count", title="exactly non-zero weights", yscale="log")
    ax_nz.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"plot saved to {args.out}")

    ok = results["sgd + prox_l1 (ISTA)"][2]
    print("SUPPORT RECOVERED" if ok else "SUPPORT NOT RECOVERED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
