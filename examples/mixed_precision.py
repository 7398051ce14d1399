"""Float16 training with dynamic loss scaling: ``gs.dynamic_loss_scale``.

float16 has a narrow range: values below about 6e-8 flush to zero and values above 65504
overflow to Inf. Small gradients therefore *underflow* in a float16 backward pass and the
weights they belong to stop learning. Loss scaling multiplies the loss by a large factor S
before differentiating (so the backward pass runs in float16's comfortable range) and divides
the gradient by S afterwards, in float32. A *dynamic* scale grows S every ``growth_interval``
clean steps and halves it, refusing the step, whenever the float16 gradient overflows.

This script trains the same MLP (float32 master weights, float16 compute) three ways on a task
with small targets, whose gradients mostly fall below float16's range:

* float32 throughout (the reference);
* float16 without loss scaling: most gradient entries of the hidden layers underflow to zero,
  so those layers stop learning. On this small task that costs little: the hidden layers do
  most of their moving in the first steps, before their gradients fall out of float16's
  range, and the three loss curves overlap. The script prints and plots, next to the loss,
  the fraction of gradient entries lost and how far the hidden layers' weights moved, so the
  size of the difference can be read rather than guessed;
* float16 with ``gs.dynamic_loss_scale(optimizer)``: the training step multiplies the loss by
  ``gs.loss_scale(opt_state)``; the wrapper unscales, refuses overflowing steps (zero update,
  optimizer state untouched) and adapts the scale.

Run it::

    pip install -e ".[examples]" && python examples/mixed_precision.py

It prints a summary and saves a plot of the losses, the lost gradient entries, the hidden
layers' movement and the loss scale over time (``mixed_precision.png``). ``--quick`` makes it
tiny (for tests). Exits with status 1 if loss scaling does not bring float16 training close to
float32.
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

IN_FEATURES, HIDDEN, OUT_FEATURES, BATCH = 32, 128, 8, 128
TARGET_SCALE = 1e-3  # small targets: small losses, gradients below float16's normal range
LAST_LAYER_SCALE = 1e-3  # a near-zero output layer (a common init): tiny backward signal


def init_params(key: jax.Array) -> list[dict[str, jax.Array]]:
    sizes = [IN_FEATURES, HIDDEN, HIDDEN, OUT_FEATURES]
    keys = jax.random.split(key, len(sizes) - 1)
    params = [
        {
            "w": jax.random.normal(k, (m, n), jnp.float32) / np.sqrt(m),
            "b": jnp.zeros(n, jnp.float32),
        }
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]
    params[-1]["w"] = LAST_LAYER_SCALE * params[-1]["w"]
    return params


def forward(params, x: jax.Array, dtype) -> jax.Array:
    """The MLP in ``dtype`` (the master weights are cast on the way in)."""
    h = x.astype(dtype)
    for i, layer in enumerate(params):
        h = h @ layer["w"].astype(dtype) + layer["b"].astype(dtype)
        if i < len(params) - 1:
            h = jax.nn.gelu(h)
    return h.astype(jnp.float32)


def make_batch(key: jax.Array, teacher: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = jax.random.normal(key, (BATCH, IN_FEATURES), jnp.float32)
    return x, TARGET_SCALE * jnp.tanh(x @ teacher)


def make_step(tx: optax.GradientTransformation, dtype, scaled: bool):
    @jax.jit
    def step(params, opt_state, x, y):
        scale = gs.loss_scale(opt_state) if scaled else jnp.ones((), jnp.float32)

        def scaled_loss(p):
            loss = jnp.mean(jnp.square(forward(p, x, dtype) - y))
            return loss * scale, loss

        (_, loss), grads = jax.value_and_grad(scaled_loss, has_aux=True)(params)
        underflow = jnp.mean(
            jnp.concatenate([(layer["w"] == 0).ravel() for layer in grads]).astype(jnp.float32)
        )
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        return optax.apply_updates(params, updates), opt_state, loss, underflow

    return step


@jax.jit
def hidden_movement(params, start) -> jax.Array:
    """How far the hidden layers' weights have moved from the start (Frobenius norm)."""
    moved = [p["w"] - s["w"] for p, s in zip(params[:-1], start[:-1], strict=True)]
    return jnp.sqrt(sum(jnp.sum(jnp.square(m)) for m in moved))


def run(tx, dtype, scaled, params, batches):
    step = make_step(tx, dtype, scaled)
    opt_state = tx.init(params)
    start = params
    losses, scales, skipped, underflow, moved = [], [], [], [], []
    for x, y in batches:
        params, opt_state, loss, zero_fraction = step(params, opt_state, x, y)
        losses.append(loss)
        underflow.append(zero_fraction)
        moved.append(hidden_movement(params, start))
        if scaled:
            stats = gs.metrics(opt_state)
            scales.append(stats["dynamic_loss_scale/loss_scale"])
            skipped.append(stats["dynamic_loss_scale/skipped"])
    return {
        "loss": np.asarray(jax.device_get(losses)),
        "underflow": np.asarray(jax.device_get(underflow)),
        "moved": np.asarray(jax.device_get(moved)),
        "scale": np.asarray(jax.device_get(scales)),
        "skipped": np.asarray(jax.device_get(skipped), bool),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps")
    parser.add_argument("--growth-interval", type=int, default=50, help="clean steps per growth")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path("mixed_precision.png"))
    parser.add_argument("--quick", action="store_true", help="a tiny run (for tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.growth_interval = 150, 5
    for name in ("steps", "growth_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    params = init_params(jax.random.key(0))
    teacher = jax.random.normal(jax.random.key(1), (IN_FEATURES, OUT_FEATURES), jnp.float32)
    keys = jax.random.split(jax.random.key(2), args.steps)
    batches = [make_batch(k, teacher) for k in keys]

    def optimizer() -> optax.GradientTransformation:
        return optax.chain(gs.clip_by_global_norm(1.0), optax.adam(args.learning_rate))

    reference = run(optimizer(), jnp.float32, False, params, batches)
    unscaled = run(optimizer(), jnp.float16, False, params, batches)
    tx = gs.dynamic_loss_scale(
        optimizer(), init_scale=2.0**15, growth_interval=args.growth_interval
    )
    scaled = run(tx, jnp.float16, True, params, batches)

    tail = max(1, args.steps // 10)
    runs = {"float32": reference, "float16": unscaled, "float16 + scaling": scaled}
    final = {name: float(np.mean(r["loss"][-tail:])) for name, r in runs.items()}
    print(
        f"{'run':18s} {'final loss':>11s} {'vs float32':>11s} {'zero weight-grad entries':>25s} "
        f"{'hidden weights moved':>21s}"
    )
    for name, r in runs.items():
        print(
            f"{name:18s} {final[name]:11.3e} {final[name] / final['float32']:10.3f}x "
            f"{100 * float(np.mean(r['underflow'])):24.1f}% {r['moved'][-1]:21.4f}"
        )
    print(
        f"loss scale: {scaled['scale'][0]:.0f} after the first step, {scaled['scale'][-1]:.0f} "
        f"at the end (max {scaled['scale'].max():.0f}); overflow steps refused: "
        f"{int(scaled['skipped'].sum())}"
    )
    # Say plainly what the loss alone hides: unscaled float16's loss can match float32's while
    # its hidden layers, whose gradients underflowed, barely move.
    moved_ratio = unscaled["moved"][-1] / reference["moved"][-1]
    print(
        f"float16 without scaling: final loss {final['float16'] / final['float32']:.2f}x "
        f"float32's (within 10%: {abs(final['float16'] / final['float32'] - 1) <= 0.1}), "
        f"hidden layers moved {moved_ratio:.2f}x as far as in float32"
    )

    styles = {"float32": "-", "float16": "--", "float16 + scaling": ":"}
    labels = {
        "float32": "float32",
        "float16": "float16, no loss scaling",
        "float16 + scaling": "float16 + gs.dynamic_loss_scale",
    }
    fig, (ax_loss, ax_zero, ax_moved, ax_scale) = plt.subplots(1, 4, figsize=(19, 4))
    for (name, r), color in zip(runs.items(), ["C0", "C1", "C2"], strict=True):
        ax_loss.semilogy(r["loss"], lw=1.2, ls=styles[name], color=color, label=labels[name])
        ax_moved.plot(r["moved"], lw=1.2, ls=styles[name], color=color, label=labels[name])
    ratio = final["float16"] / final["float32"]
    loss_title = f"training loss (float16 unscaled ends at {ratio:.2f}x float32)"
    ax_loss.set(xlabel="step", ylabel="loss", title=loss_title)
    ax_loss.legend(fontsize=8)
    ax_moved.set(
        xlabel="step", ylabel="||W - W0||", title="how far the hidden layers' weights moved"
    )
    ax_moved.legend(fontsize=8)
    steps = np.arange(args.steps)
    ax_zero.plot(steps, 100 * unscaled["underflow"], lw=1.0, color="C1", label="no loss scaling")
    ax_zero.plot(
        steps, 100 * scaled["underflow"], lw=1.0, ls=":", color="C2", label="dynamic_loss_scale"
    )
    ax_zero.set(xlabel="step", ylabel="%", title="weight-gradient entries lost to underflow")
    ax_zero.legend(fontsize=8)
    ax_scale.semilogy(steps, scaled["scale"], lw=1.0, label="loss scale")
    ax_scale.scatter(
        steps[scaled["skipped"]],
        scaled["scale"][scaled["skipped"]],
        color="red",
        marker="v",
        zorder=3,
        label="overflow: step refused, scale halved",
    )
    ax_scale.set(xlabel="step", ylabel="S", title="dynamic loss scale")
    ax_scale.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"plot saved to {args.out}")

    # Loss scaling must bring float16 close to float32 and beat unscaled float16.
    ok = (
        np.all(np.isfinite(scaled["loss"]))
        and final["float16 + scaling"] < 1.5 * final["float32"]
        and float(np.mean(scaled["underflow"])) < float(np.mean(unscaled["underflow"]))
    )
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
