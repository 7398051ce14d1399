"""Train a Flax NNX model with gradsafe's recommended stack, and watch what it does.

The model is a small MLP regressing a smooth function of its inputs. Two kinds of trouble are
injected into the data stream, as they happen in real runs:

* **corrupted batches** (every ``--spike-every`` steps the targets are multiplied by 1000): the
  gradient norm jumps by orders of magnitude. ``gs.stabilize``'s ZClip sees the spike against
  its running statistics and scales that gradient down.
* **a NaN batch** (one step): the loss and the gradient are NaN. ``skip_nonfinite`` refuses the
  step: the parameters and Adam's moments stay exactly as they were.

The optimizer is the only line that changes from a plain NNX loop::

    optimizer = nnx.Optimizer(model, gs.stabilize(optax.adamw(1e-3)), wrt=nnx.Param)
    optimizer.update(model, grads, value=loss)   # the loss goes to the guards as `value`

Every ``--log-every`` steps it logs a few chosen figures of ``gs.metrics(optimizer.opt_state)``
(the gradient norm, ZClip's threshold, clip and refusal counts); at the end it saves a
plot of the loss, the gradient norm (with ZClip's threshold) and the clip/refusal events.

Run it::

    pip install -e ".[examples]" && python examples/flax_nnx_train.py

``--quick`` makes it tiny (for tests). Exits with status 1 if the run did not survive.
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
from flax import nnx
from tqdm import tqdm

import gradsafe as gs

matplotlib.use("Agg")  # write files only; no display needed
import matplotlib.pyplot as plt

IN_FEATURES = 8
HIDDEN = 64
BATCH = 64
CORRUPTION = 1000.0  # a corrupted batch's targets are this many times too large


class MLP(nnx.Module):
    """Two hidden layers with GELU activations."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden1 = nnx.Linear(IN_FEATURES, HIDDEN, rngs=rngs)
        self.hidden2 = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.gelu(self.hidden1(x))
        x = nnx.gelu(self.hidden2(x))
        return self.out(x)[:, 0]


def make_batch(key: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    """A batch of inputs and targets; ``kind`` is "clean", "corrupted" or "nan"."""
    x = jax.random.normal(key, (BATCH, IN_FEATURES), jnp.float32)
    y = jnp.sin(x[:, 0] + 0.5 * x[:, 1]) + 0.3 * x[:, 2] * x[:, 3]
    if kind == "corrupted":
        y = y * CORRUPTION
    elif kind == "nan":
        x = x.at[0, 0].set(jnp.nan)
    return x, y


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
    """One step: loss, gradient, the guarded update; returns the loss and gradsafe's metrics."""

    def loss_fn(model: MLP) -> jax.Array:
        return jnp.mean(jnp.square(model(x) - y))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, value=loss)
    return loss, gs.metrics(optimizer.opt_state)


@nnx.jit
def eval_loss(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(model(x) - y))


def batch_kind(step: int, spike_every: int, nan_step: int) -> str:
    if step == nan_step:
        return "nan"
    if step > 0 and step % spike_every == 0:
        return "corrupted"
    return "clean"


# The figures worth a log line: the norm ZClip saw and its threshold, whether it clipped and
# whether that was a z-score spike, and the guard's verdict. `gs.metrics` returns all of them
# (and more); log the rest only when debugging.
LOGGED = ("zclip/norm", "zclip/threshold", "zclip/spike")


def log_line(step: int, loss: float, stats: dict, history: dict[str, list]) -> str:
    """One readable line: the loss, a few chosen metrics, and clip/refusal counts so far."""
    shown = "  ".join(f"{name}={float(stats[name]):.4g}" for name in LOGGED)
    reason = gs.SKIP_REASONS[int(stats["skip_nonfinite/reason"])]
    return (
        f"step {step}: loss={loss:.4g}  {shown}  clipped so far={sum(history['clipped'])}  "
        f"refused so far={sum(history['skipped'])} (this step: {reason})"
    )


def plot(history: dict[str, np.ndarray], out: Path) -> None:
    steps = np.arange(len(history["loss"]))
    fig, (ax_loss, ax_norm) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    finite = np.isfinite(history["loss"])
    ax_loss.semilogy(steps[finite], history["loss"][finite], lw=0.8, label="training loss")
    ax_loss.set_ylabel("loss (MSE)")
    ax_norm.semilogy(steps, history["norm"], lw=0.8, label="gradient norm (before clipping)")
    ax_norm.semilogy(steps, history["threshold"], lw=1.0, ls="--", label="ZClip threshold")
    clipped, skipped = history["clipped"], history["skipped"]
    for ax in (ax_loss, ax_norm):
        for s in steps[skipped]:
            ax.axvline(s, color="red", lw=1.0, alpha=0.7)
    top = np.nanmax(np.where(np.isfinite(history["norm"]), history["norm"], np.nan))
    ax_norm.scatter(
        steps[clipped],
        np.full(clipped.sum(), top),
        marker="v",
        color="orange",
        label="clipped",
        zorder=3,
    )
    ax_norm.plot([], [], color="red", label="refused (non-finite)")
    ax_norm.set_xlabel("step")
    ax_norm.set_ylabel("norm")
    ax_loss.legend(loc="upper right")
    ax_norm.legend(loc="upper right", fontsize=8)
    fig.suptitle("Flax NNX + gs.stabilize(optax.adamw): spikes clipped, NaN step refused")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps")
    parser.add_argument("--log-every", type=int, default=100, help="log metrics every N steps")
    parser.add_argument("--spike-every", type=int, default=150, help="corrupt every N-th batch")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=Path("flax_nnx_train.png"))
    parser.add_argument("--quick", action="store_true", help="a tiny run (for tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.log_every, args.spike_every = 120, 40, 40
    for name in ("steps", "log_every", "spike_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    # One NaN batch, after ZClip's warm-up and between two corrupted batches.
    nan_step = min(args.steps * 2 // 3 + args.spike_every // 2, args.steps - 1)

    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, gs.stabilize(optax.adamw(args.learning_rate)), wrt=nnx.Param)
    test_x, test_y = make_batch(jax.random.key(12345), "clean")
    initial_test_loss = float(eval_loss(model, test_x, test_y))

    keys = jax.random.split(jax.random.key(1), args.steps)
    fields = ("loss", "norm", "threshold", "clipped", "spike", "skipped")
    history: dict[str, list] = {k: [] for k in fields}
    for step in tqdm(range(args.steps), desc="training", disable=None):
        x, y = make_batch(keys[step], batch_kind(step, args.spike_every, nan_step))
        loss, stats = train_step(model, optimizer, x, y)
        history["loss"].append(float(loss))
        history["norm"].append(float(stats["zclip/norm"]))
        history["threshold"].append(float(stats["zclip/threshold"]))
        history["clipped"].append(bool(stats["zclip/clipped"]))
        history["spike"].append(bool(stats["zclip/spike"]))
        history["skipped"].append(bool(stats["skip_nonfinite/skipped"]))
        if step % args.log_every == 0 or step == args.steps - 1:
            tqdm.write(log_line(step, float(loss), stats, history))

    arrays = {k: np.asarray(v) for k, v in history.items()}
    plot(arrays, args.out)
    final_test_loss = float(eval_loss(model, test_x, test_y))
    params_finite = all(
        bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(nnx.state(model, nnx.Param))
    )
    corrupted = sum(
        batch_kind(s, args.spike_every, nan_step) == "corrupted" for s in range(args.steps)
    )
    print(f"test loss: {initial_test_loss:.4f} at the start, {final_test_loss:.4f} at the end")
    print(
        f"corrupted batches: {corrupted}, steps clipped: {int(arrays['clipped'].sum())} "
        f"(z-score spikes: {int(arrays['spike'].sum())}; the other clipped steps are those "
        "above ZClip's default cap max_norm=1.0)"
    )
    print(f"steps refused (non-finite): {int(arrays['skipped'].sum())}")
    print(f"plot saved to {args.out}")

    survived = (
        params_finite
        and math.isfinite(final_test_loss)
        and final_test_loss < initial_test_loss
        and int(arrays["skipped"].sum()) == 1
        and bool(arrays["clipped"].any())
    )
    print("SURVIVED" if survived else "DID NOT SURVIVE")
    return 0 if survived else 1


if __name__ == "__main__":
    sys.exit(main())
