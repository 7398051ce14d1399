"""gradsafe quickstart: the same training run with plain Adam and with gradsafe, side by side.

The model is an identity-initialised ReLU RNN (IRNN, Le et al. 2015) on the adding problem
(Hochreiter and Schmidhuber 1997): each input step carries a random value in [0, 1) and a marker
bit; exactly two steps are marked, and the target is the sum of their two values. Predicting the
mean (1.0) gives a mean squared error of about 0.167; solving the task gives far less.

At a high learning rate the recurrent weights soon grow past the identity, the hidden state and
the gradient explode (norms of 1e5 to 1e10 within the first few steps). That one burst of huge
gradients fills Adam's second-moment estimate, which decays only by 0.999 per step: for thousands
of steps afterwards plain Adam's updates are near zero and its loss stays at or above the
predict-the-mean error. With gradsafe's clipping in front of the same Adam, the burst reaches the
optimizer with norm 1, Adam keeps moving, and the run solves the task.

Run it::

    pip install -e ".[examples]" && python examples/quickstart.py

It prints a table and saves a plot of loss and gradient norm per step (``quickstart.png``). The
verdict is computed from the final loss (mean of the last 10% of steps): a run *solved* the
task if it ends below half the predict-the-mean error; gradsafe *rescued* the run if its run
solved the task and plain Adam's did not. It exits with status 1 if gradsafe does not rescue
the run. ``--quick`` makes it small (sequences of length 30, 600 steps; for tests).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from tqdm import tqdm

import gradsafe as gs

matplotlib.use("Agg")  # write files only; no display needed
import matplotlib.pyplot as plt

HIDDEN = 64
BATCH = 32
CLIP_NORM = 1.0
MEAN_PREDICTOR_MSE = 1 / 6  # variance of the sum of two U(0, 1) values
SOLVED_FRACTION = 0.5  # a run "solved" the task if it ends below half the mean predictor's MSE
MEAN_LEVEL_FACTOR = 1.5  # up to 1.5x that MSE it learned the mean at best; above, worse


def gradsafe_optimizer(learning_rate: float) -> optax.GradientTransformation:
    """The gradsafe side of the comparison: plain Adam with gradsafe's clipping in front."""
    return optax.chain(gs.clip_by_global_norm(CLIP_NORM), optax.adam(learning_rate))
    # The recommended preset (ZClip + a non-finite guard) is a one-line switch:
    # return gs.stabilize(optax.adam(learning_rate))


# ----------------------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------------------


def adding_batch(key: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
    """A batch of adding-problem sequences: inputs (BATCH, length, 2) and targets (BATCH,)."""
    value_key, first_key, second_key = jax.random.split(key, 3)
    values = jax.random.uniform(value_key, (BATCH, length), jnp.float32)
    # One marker in each half of the sequence, so the net must remember across time.
    first = jax.random.randint(first_key, (BATCH,), 0, length // 2)
    second = jax.random.randint(second_key, (BATCH,), length // 2, length)
    markers = jax.nn.one_hot(first, length) + jax.nn.one_hot(second, length)
    inputs = jnp.stack([values, markers], axis=-1)
    targets = jnp.sum(values * markers, axis=1)
    return inputs, targets


def init_params(key: jax.Array) -> dict[str, jax.Array]:
    """IRNN parameters: identity recurrence, zero biases, small input and output weights."""
    input_key, output_key = jax.random.split(key)
    return {
        "input": 1e-3 * jax.random.normal(input_key, (2, HIDDEN), jnp.float32),
        "recurrent": jnp.eye(HIDDEN, dtype=jnp.float32),
        "bias": jnp.zeros((HIDDEN,), jnp.float32),
        "readout": 1e-3 * jax.random.normal(output_key, (HIDDEN, 1), jnp.float32),
        "readout_bias": jnp.zeros((1,), jnp.float32),
    }


def loss_fn(params: dict[str, jax.Array], inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean squared error of the RNN's prediction from its last hidden state."""

    def cell(hidden: jax.Array, x: jax.Array) -> tuple[jax.Array, None]:
        pre = hidden @ params["recurrent"] + x @ params["input"] + params["bias"]
        return jax.nn.relu(pre), None

    start = jnp.zeros((inputs.shape[0], HIDDEN), jnp.float32)
    last, _ = jax.lax.scan(cell, start, jnp.swapaxes(inputs, 0, 1))
    prediction = (last @ params["readout"] + params["readout_bias"])[:, 0]
    return jnp.mean(jnp.square(prediction - targets))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


class History(NamedTuple):
    """Per-step records of one run."""

    loss: np.ndarray  # training loss
    grad_norm: np.ndarray  # global gradient norm before any clipping
    clipped: np.ndarray  # whether a gradsafe clipper scaled the gradient down
    skipped: np.ndarray  # whether a gradsafe guard refused the step
    seconds: float


def _any_stat(stats: dict[str, jax.Array], field: str) -> jax.Array:
    """Whether any gradsafe transform in the state reports ``field`` (e.g. ``clipped``) True."""
    flags = [jnp.asarray(v, bool) for k, v in stats.items() if k.endswith("/" + field)]
    return jnp.any(jnp.stack(flags)) if flags else jnp.array(False)


def train(
    tx: optax.GradientTransformation, *, steps: int, length: int, seed: int, chunk: int, name: str
) -> History:
    """Train a fresh IRNN with ``tx``; ``chunk`` steps run per compiled ``lax.scan`` call."""
    params = init_params(jax.random.key(seed))
    opt_state = tx.init(params)
    data_keys = jax.random.split(jax.random.key(seed + 1), steps)  # same batches for every run

    def step(carry: tuple[Any, Any], key: jax.Array):
        params, opt_state = carry
        inputs, targets = adding_batch(key, length)
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        params = optax.apply_updates(params, updates)
        stats = gs.metrics(opt_state)
        record = (loss, gs.global_norm(grads), _any_stat(stats, "clipped"))
        return (params, opt_state), (*record, _any_stat(stats, "skipped"))

    @jax.jit
    def run_chunk(carry, keys):
        return jax.lax.scan(step, carry, keys)

    carry = (params, opt_state)
    records = []
    start = time.perf_counter()
    with tqdm(total=steps, desc=f"{name:>10}", unit="step", leave=True) as bar:
        for begin in range(0, steps, chunk):
            carry, record = run_chunk(carry, data_keys[begin : begin + chunk])
            records.append(jax.device_get(record))
            bar.update(len(records[-1][0]))
            bar.set_postfix(loss=f"{float(records[-1][0][-1]):.3g}")
    seconds = time.perf_counter() - start
    loss, norm, clipped, skipped = (np.concatenate(parts) for parts in zip(*records, strict=True))
    return History(loss, norm, clipped, skipped, seconds)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def final_loss(history: History) -> float:
    """Mean training loss over the last 10% of steps (at most 100); NaN if any was non-finite."""
    tail = history.loss[-min(100, max(1, len(history.loss) // 10)) :]
    return float(np.mean(tail)) if np.all(np.isfinite(tail)) else math.nan


def first_nonfinite(history: History) -> int | None:
    bad = np.flatnonzero(~np.isfinite(history.loss))
    return int(bad[0]) if bad.size else None


def summary_table(runs: dict[str, History]) -> str:
    """A plain-text table, one column per run."""

    def nonfinite(h: History) -> str:
        step = first_nonfinite(h)
        return "no" if step is None else f"yes (step {step})"

    rows = [
        ("final loss (last steps)", lambda h: f"{final_loss(h):.4g}"),
        ("outcome", outcome),
        ("best loss", lambda h: f"{np.nanmin(h.loss):.4g}"),
        ("NaN/Inf loss", nonfinite),
        ("peak gradient norm", lambda h: f"{np.nanmax(h.grad_norm):.3g}"),
        ("steps clipped", lambda h: f"{int(h.clipped.sum())} / {len(h.loss)}"),
        ("steps skipped", lambda h: f"{int(h.skipped.sum())}"),
        ("time (s)", lambda h: f"{h.seconds:.1f}"),
    ]
    names = list(runs)
    width = max(len(label) for label, _ in rows)
    cols = [max(len(n), *(len(fmt(runs[n])) for _, fmt in rows)) for n in names]
    header = " " * width + " | " + " | ".join(n.rjust(c) for n, c in zip(names, cols, strict=True))
    lines = [header, "-" * len(header)]
    for label, fmt in rows:
        cells = [fmt(runs[n]).rjust(c) for n, c in zip(names, cols, strict=True)]
        lines.append(label.ljust(width) + " | " + " | ".join(cells))
    return "\n".join(lines)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Running median over ``window`` steps (robust to the spikes it is meant to show around)."""
    if window <= 1 or len(values) < window:
        return values
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    windows = np.lib.stride_tricks.sliding_window_view(padded, window)
    return np.median(windows, axis=1)


def plot(runs: dict[str, History], out: Path, *, title: str) -> None:
    """Loss (top) and gradient norm (bottom) per step, log scales; left: the first steps."""
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
    steps = len(next(iter(runs.values())).loss)
    window = max(1, min(50, steps // 40))
    early = min(steps, 60)
    fig, axes = plt.subplots(
        2, 2, figsize=(12, 7.5), sharey="row", gridspec_kw={"width_ratios": [1, 3]}
    )
    (early_loss, ax_loss), (early_norm, ax_norm) = axes
    x = np.arange(1, steps + 1)
    for index, (name, history) in enumerate(runs.items()):
        color = colors[index % len(colors)]
        smoothed = smooth(history.loss, window)
        ax_loss.plot(x, history.loss, color=color, alpha=0.2, linewidth=0.7)
        ax_loss.plot(x, smoothed, color=color, linewidth=1.8, label=name)
        # The first run on top: its steady norm would hide under the second's noisy one.
        on_top = len(runs) - index
        ax_norm.plot(x, history.grad_norm, color=color, alpha=0.75, linewidth=0.7, zorder=on_top)
        early_loss.plot(x[:early], history.loss[:early], color=color, linewidth=1.3, label=name)
        early_norm.plot(x[:early], history.grad_norm[:early], color=color, linewidth=1.3)
        step = first_nonfinite(history)
        if step is not None:
            for ax in axes.flat:
                ax.axvline(step + 1, color=color, linestyle=":", linewidth=1.2)
            ax_loss.annotate(
                f" {name}: NaN/Inf from step {step + 1}",
                xy=(step + 1, 0.97),
                xycoords=("data", "axes fraction"),
                va="top",
                color=color,
                fontsize=9,
            )
    label_box = {"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1}
    for ax, level, text in (
        (ax_loss, MEAN_PREDICTOR_MSE, "predict-the-mean MSE (1/6)"),
        (ax_norm, CLIP_NORM, f"clip threshold ({CLIP_NORM:g})"),
    ):
        ax.text(
            steps,
            level,
            text + " ",
            color="0.3",
            ha="right",
            va="bottom",
            fontsize=9,
            bbox=label_box,
        )
    for ax, level in (
        (ax_loss, MEAN_PREDICTOR_MSE),
        (early_loss, MEAN_PREDICTOR_MSE),
        (ax_norm, CLIP_NORM),
        (early_norm, CLIP_NORM),
    ):
        ax.axhline(level, color="0.45", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
    early_loss.set_title(f"First {early} steps: the explosion", fontsize=11)
    ax_loss.set_title(
        f"All steps (thin: per step; thick: running median over {window} steps)", fontsize=11
    )
    early_norm.set_title(f"First {early} steps", fontsize=11)
    ax_norm.set_title("All steps: global gradient norm", fontsize=11)
    early_loss.set_ylabel("training loss (MSE)")
    early_norm.set_ylabel("gradient norm before clipping")
    for ax in (early_norm, ax_norm):
        ax.set_xlabel("training step")
    early_loss.set_xlim(1, early)
    early_norm.set_xlim(1, early)
    ax_loss.set_xlim(1, steps)
    ax_norm.set_xlim(1, steps)
    ax_loss.legend(loc="upper right", framealpha=0.9)
    fig.suptitle(title, fontsize=13, fontweight="bold")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def outcome(history: History) -> str:
    """What a run achieved, judged by its final loss against predicting the mean (MSE 1/6):
    "diverged" (NaN/Inf), "solved" (below SOLVED_FRACTION of the mean predictor's error),
    "mean level" (no better than that, but at most MEAN_LEVEL_FACTOR times the mean
    predictor's error) or "worse than the mean" (above that)."""
    loss = final_loss(history)
    if not math.isfinite(loss):
        return "diverged"
    if loss < SOLVED_FRACTION * MEAN_PREDICTOR_MSE:
        return "solved"
    if loss <= MEAN_LEVEL_FACTOR * MEAN_PREDICTOR_MSE:
        return "mean level"
    return "worse than the mean"


def rescued(plain: History, safe: History) -> tuple[bool, str]:
    """Whether gradsafe rescued the run: the gradsafe run solved the task and plain Adam did
    not (see ``outcome``). A run that only learned to predict the mean is not a rescue."""
    plain_outcome, safe_outcome = outcome(plain), outcome(safe)
    figures = (
        f"final loss {final_loss(safe):.4g} with gradsafe, {final_loss(plain):.4g} with plain "
        f"Adam; predicting the mean gives {MEAN_PREDICTOR_MSE:.4g}, 'solved' means below "
        f"{SOLVED_FRACTION * MEAN_PREDICTOR_MSE:.4g}"
    )
    if safe_outcome == "solved" and plain_outcome != "solved":
        return True, f"gradsafe solved the task, plain Adam did not ({plain_outcome}): {figures}"
    if safe_outcome == "solved":
        return False, f"both runs solved the task: nothing to rescue: {figures}"
    return False, f"gradsafe did not solve the task ({safe_outcome}): {figures}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("quickstart.png"), help="PNG to write")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--length", type=int, default=None, help="sequence length")
    parser.add_argument("--seed", type=int, default=2, help="random seed (model and data)")
    parser.add_argument("--quick", action="store_true", help="a tiny run, for the test suite")
    args = parser.parse_args(argv)
    # --quick: shorter sequences, which the rescued run learns within a few hundred steps.
    steps = args.steps or (600 if args.quick else 3000)
    length = args.length or (30 if args.quick else 50)
    if steps < 1 or length < 2:
        parser.error("--steps must be >= 1 and --length >= 2")

    title = f"IRNN on the adding problem (length {length}), Adam lr={args.lr:g}, seed {args.seed}"
    print(title)
    optimizers = {
        "plain Adam": optax.adam(args.lr),
        "gradsafe": gradsafe_optimizer(args.lr),
    }
    runs = {
        name: train(tx, steps=steps, length=length, seed=args.seed, chunk=100, name=name)
        for name, tx in optimizers.items()
    }
    print()
    print(summary_table(runs))
    plot(runs, args.out, title=title)
    ok, reason = rescued(*runs.values())
    print()
    print(("RESCUED: " if ok else "NOT RESCUED: ") + reason)
    print(f"plot saved to {args.out.resolve()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
