"""Train a Flax Linen classifier with a ``TrainState`` and a hand-written step that refuses
poisoned batches.

The model is an MLP classifying points of three interleaved spirals. Every ``--poison-every``
steps a poisoned batch arrives (inputs multiplied by 50, labels shuffled), as a bad shard or a
preprocessing bug would produce: its loss is far above the running loss. The optimizer is

    gs.stabilize(optax.adam(lr), clip="clip_by_global_norm", skip_spikes={...})

whose ``skip_on_spike`` guard compares each step's loss and gradient norm with a window of
recent ones and refuses outliers (zero update, optimizer state untouched). It needs the loss,
so the step calls ``tx.update(grads, opt_state, params, value=loss)`` itself instead of
``TrainState.apply_gradients`` (which has no way to pass extra arguments to the optimizer).

Run it::

    pip install -e ".[examples]" && python examples/flax_linen_train.py

It prints the refused steps with their reason and saves a plot (``flax_linen_train.png``).
``--quick`` makes it tiny (for tests). Exits with status 1 if a poisoned batch got through or
the classifier did not learn.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax.training import train_state

import gradsafe as gs

matplotlib.use("Agg")  # write files only; no display needed
import matplotlib.pyplot as plt

CLASSES = 3
BATCH = 128
POISON_SCALE = 50.0


class Classifier(nn.Module):
    hidden: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(CLASSES)(x)


def spirals(key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """``n`` points of three noisy interleaved spirals and their labels."""
    label_key, radius_key, noise_key = jax.random.split(key, 3)
    labels = jax.random.randint(label_key, (n,), 0, CLASSES)
    radius = jax.random.uniform(radius_key, (n,), jnp.float32, 0.05, 1.0)
    angle = 4.0 * radius + labels.astype(jnp.float32) * (2 * jnp.pi / CLASSES)
    points = radius[:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=1)
    points = points + 0.1 * jax.random.normal(noise_key, points.shape, jnp.float32)
    return points, labels


def poison(key: jax.Array, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    return POISON_SCALE * x, jax.random.permutation(key, y)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@jax.jit
def train_step(state: train_state.TrainState, x: jax.Array, y: jax.Array):
    """One step that hands the loss to the optimizer as ``value``."""

    def loss_fn(params):
        return cross_entropy(state.apply_fn({"params": params}, x), y)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, value=loss)
    state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
    )
    return state, loss, gs.metrics(opt_state)


@jax.jit
def accuracy(state: train_state.TrainState, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = state.apply_fn({"params": state.params}, x)
    return jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))


def plot(losses, refused, poisoned, out: Path) -> None:
    steps = np.arange(len(losses))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.semilogy(steps, losses, lw=0.8, label="batch loss")
    ax.scatter(
        steps[poisoned],
        losses[poisoned],
        marker="x",
        color="black",
        zorder=3,
        label="poisoned batch",
    )
    for s in steps[refused]:
        ax.axvline(s, color="red", lw=1.0, alpha=0.5)
    ax.plot([], [], color="red", label="refused by skip_on_spike")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend(loc="upper right")
    ax.set_title("Flax Linen TrainState: poisoned batches refused, not learned from")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
    parser.add_argument("--poison-every", type=int, default=97, help="poison every N-th batch")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=Path("flax_linen_train.png"))
    parser.add_argument("--quick", action="store_true", help="a tiny run (for tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.poison_every = 150, 45
    for name in ("steps", "poison_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    # The spike guard needs some history before it judges: the first poisoned batch comes
    # after `min_history` clean steps.
    tx = gs.stabilize(
        optax.adam(args.learning_rate),
        clip="clip_by_global_norm",
        skip_spikes={"window": 64, "min_history": 32, "sigma": 6.0},
    )
    model = Classifier()
    x0, _ = spirals(jax.random.key(0), BATCH)
    params = model.init(jax.random.key(1), x0)["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    keys = jax.random.split(jax.random.key(2), args.steps)
    losses, refused, poisoned = [], [], []
    for step in range(args.steps):
        data_key, poison_key = jax.random.split(keys[step])
        x, y = spirals(data_key, BATCH)
        is_poisoned = step >= 40 and step % args.poison_every == 0
        if is_poisoned:
            x, y = poison(poison_key, x, y)
        state, loss, stats = train_step(state, x, y)
        losses.append(float(loss))
        refused.append(bool(stats["skip_on_spike/skipped"]))
        poisoned.append(is_poisoned)
        if refused[-1] or is_poisoned:
            reason = gs.SKIP_REASONS[int(stats["skip_on_spike/reason"])]
            print(
                f"step {step}: loss {float(loss):.3g} (window mean "
                f"{float(stats['skip_on_spike/loss_mean']):.3g}), poisoned={is_poisoned}, "
                f"refused={refused[-1]} ({reason})"
            )

    losses_a, refused_a, poisoned_a = np.asarray(losses), np.asarray(refused), np.asarray(poisoned)
    plot(losses_a, refused_a, poisoned_a, args.out)
    test_x, test_y = spirals(jax.random.key(99), 4096)
    test_accuracy = float(accuracy(state, test_x, test_y))
    stats = gs.metrics(state.opt_state)
    print(f"poisoned batches: {int(poisoned_a.sum())}, refused steps: {int(refused_a.sum())}")
    print(f"skip_on_spike/total_skips: {int(stats['skip_on_spike/total_skips'])}")
    print(f"test accuracy: {test_accuracy:.3f}")
    print(f"plot saved to {args.out}")

    every_poison_refused = bool(np.all(refused_a[poisoned_a]))
    learned = test_accuracy > (0.6 if args.quick else 0.9)
    ok = every_poison_refused and learned
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
