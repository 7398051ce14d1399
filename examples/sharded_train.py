"""Data- and model-parallel training with gradsafe on 8 (virtual CPU) devices, two ways.

The same MLP regression is trained three times from the same start:

1. on one device (the reference);
2. with ``jax.jit`` on arrays placed with ``NamedSharding`` on a 4 x 2 mesh: the batch is split
   over the ``"data"`` axis, the hidden layer over the ``"model"`` axis. XLA partitions the
   program; gradsafe's transforms see global arrays, so nothing changes in the optimizer;
3. with ``jax.shard_map``, where each device holds only its shard and the code is written per
   device: the loss is averaged with ``pmean``, the hidden layer's output summed with ``psum``,
   and gradsafe's transforms get ``axis_name=("data", "model")`` so that norms, clipping
   decisions and refusals are taken over the whole gradient (leaves replicated along an axis
   are counted once), the same on every device.

All three give the same losses, the same clipping and the same final parameters (to float32
rounding), which the script checks. Without ``axis_name`` in (3) each device would clip its
own shard by its own norm, and the runs would drift apart.

Run it::

    pip install -e ".[examples]" && python examples/sharded_train.py

``--quick`` makes it tiny (for tests). Exits with status 1 if the runs disagree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import jax

# Eight CPU devices, so the example runs anywhere; this must come before any other JAX use.
jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import gradsafe as gs  # noqa: E402

matplotlib.use("Agg")  # write files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

IN_FEATURES, HIDDEN, OUT_FEATURES, BATCH = 16, 64, 4, 64
AXES = ("data", "model")
PARAM_SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}
BATCH_SPEC = P("data", None)
SPIKE_EVERY = 25  # every 25th batch has targets 100 times too large: the clip has work to do


def make_optimizer(learning_rate: float, axis_name: Any = None) -> optax.GradientTransformation:
    clip = gs.clip_by_global_norm(1.0, axis_name=axis_name)
    return gs.stabilize(optax.adam(learning_rate), clip=clip, axis_name=axis_name)


def init_params(key: jax.Array) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (IN_FEATURES, HIDDEN), jnp.float32) / IN_FEATURES**0.5,
        "b1": jnp.zeros(HIDDEN, jnp.float32),
        "w2": jax.random.normal(k2, (HIDDEN, OUT_FEATURES), jnp.float32) / HIDDEN**0.5,
        "b2": jnp.zeros(OUT_FEATURES, jnp.float32),
    }


def make_batches(key: jax.Array, steps: int) -> tuple[jax.Array, jax.Array]:
    """All batches at once: inputs (steps, BATCH, IN) and targets (steps, BATCH, OUT)."""
    x_key, w_key = jax.random.split(key)
    x = jax.random.normal(x_key, (steps, BATCH, IN_FEATURES), jnp.float32)
    teacher = jax.random.normal(w_key, (IN_FEATURES, OUT_FEATURES), jnp.float32)
    y = jnp.tanh(x @ teacher)
    spikes = (jnp.arange(steps) % SPIKE_EVERY == SPIKE_EVERY // 2).astype(jnp.float32)
    return x, y * (1.0 + 99.0 * spikes)[:, None, None]


def predict(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def global_step(tx, params, opt_state, x, y):
    """One step written for global arrays (single device, or jit with sharded inputs)."""

    def loss_fn(p):
        return jnp.mean(jnp.square(predict(p, x) - y))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    norm = gs.metrics(opt_state)["clip_by_global_norm/norm"]
    return optax.apply_updates(params, updates), opt_state, loss, norm


def per_device_step(tx, params, opt_state, x, y):
    """The same step written per device, for shard_map: explicit collectives."""

    def loss_fn(p):
        # This device's rows of the batch and columns of the hidden layer.
        hidden = jax.nn.gelu(x @ p["w1"] + p["b1"])
        out = jax.lax.psum(hidden @ p["w2"], "model") + p["b2"]  # sum over hidden shards
        return jax.lax.pmean(jnp.mean(jnp.square(out - y)), "data")  # mean over batch shards

    # JAX's transpose rules make these the gradients of the global loss, already reduced over
    # "data" for parameters replicated along it (no manual pmean of the gradients needed).
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    norm = gs.metrics(opt_state)["clip_by_global_norm/norm"]
    return optax.apply_updates(params, updates), opt_state, loss, norm


def state_specs(opt_state: Any, params: dict[str, jax.Array]) -> Any:
    """PartitionSpecs for an optimizer state: parameter-shaped parts (Adam's moments) are
    sharded like the parameters, everything else (counters, gradsafe's stats) replicated."""
    params_def = jax.tree.structure(params)
    is_params_like = lambda node: jax.tree.structure(node) == params_def
    return jax.tree.map(
        lambda node: PARAM_SPECS if is_params_like(node) else P(),
        opt_state,
        is_leaf=is_params_like,
    )


def train(step_fn, tx, params, xs, ys):
    """Run the (already compiled) step over all batches; per-step losses and clip norms."""
    opt_state = tx.init(params)
    losses, norms = [], []
    for x, y in zip(xs, ys, strict=True):
        params, opt_state, loss, norm = step_fn(params, opt_state, x, y)
        losses.append(loss)
        norms.append(norm)
    return params, np.asarray(jax.device_get(losses)), np.asarray(jax.device_get(norms))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--out", type=Path, default=Path("sharded_train.png"))
    parser.add_argument("--quick", action="store_true", help="a tiny run (for tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 30
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if jax.device_count() < 8:
        print(f"needs 8 devices, found {jax.device_count()}", file=sys.stderr)
        return 1

    params = init_params(jax.random.key(0))
    xs, ys = make_batches(jax.random.key(1), args.steps)

    # 1. One device.
    tx = make_optimizer(args.learning_rate)
    single = jax.jit(lambda *a: global_step(tx, *a))
    ref_params, ref_losses, ref_norms = train(single, tx, params, xs, ys)

    # 2. jit + NamedSharding: place the inputs, the program is the single-device one.
    mesh = jax.make_mesh((4, 2), AXES, axis_types=(AxisType.Auto, AxisType.Auto))
    place = lambda tree, specs: jax.tree.map(
        lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs
    )
    batch_sharding = NamedSharding(mesh, P(None, *BATCH_SPEC))
    sharded_params = place(params, PARAM_SPECS)
    xs_sharded = jax.device_put(xs, batch_sharding)
    ys_sharded = jax.device_put(ys, batch_sharding)
    jit_params, jit_losses, jit_norms = train(single, tx, sharded_params, xs_sharded, ys_sharded)
    print(f"jit + NamedSharding: w1 is laid out as {jit_params['w1'].sharding.spec}")

    # 3. shard_map: per-device code, gradsafe told the mesh axes.
    tx_axes = make_optimizer(args.learning_rate, axis_name=AXES)
    opt_specs = state_specs(jax.eval_shape(tx_axes.init, params), params)
    mapped = jax.shard_map(
        lambda *a: per_device_step(tx_axes, *a),
        mesh=mesh,
        in_specs=(PARAM_SPECS, opt_specs, BATCH_SPEC, BATCH_SPEC),
        out_specs=(PARAM_SPECS, opt_specs, P(), P()),
    )
    map_params, map_losses, map_norms = train(
        jax.jit(mapped), tx_axes, sharded_params, xs_sharded, ys_sharded
    )

    def max_diff(a, b):
        return max(
            float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
            for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )

    rows = [
        ("jit + NamedSharding", jit_losses, jit_norms, jit_params),
        ("shard_map + axis_name", map_losses, map_norms, map_params),
    ]
    clipped = int(np.sum(ref_norms > 1.0))
    print(f"single device: final loss {ref_losses[-1]:.5f}; {clipped}/{args.steps} steps clipped")
    agree = True
    for name, losses, norms, final in rows:
        loss_gap = float(np.max(np.abs(losses - ref_losses) / np.maximum(np.abs(ref_losses), 1)))
        norm_gap = float(np.max(np.abs(norms - ref_norms) / np.maximum(ref_norms, 1e-6)))
        param_gap = max_diff(final, ref_params)
        print(
            f"{name:22s}: final loss {losses[-1]:.5f}; vs one device: loss rel. diff "
            f"{loss_gap:.1e}, clip-norm rel. diff {norm_gap:.1e}, params max diff {param_gap:.1e}"
        )
        agree &= loss_gap < 1e-4 and norm_gap < 1e-4 and param_gap < 1e-4

    fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(11, 4))
    for (name, losses, norms, _), style in zip(
        [("one device", ref_losses, ref_norms, None), *rows], ["-", "--", ":"], strict=True
    ):
        ax_loss.semilogy(losses, style, label=name)
        ax_norm.semilogy(norms, style, label=name)
    ax_norm.axhline(1.0, color="gray", lw=0.8, label="max_norm")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_norm.set(xlabel="step", ylabel="global norm", title="gradient norm seen by the clip")
    ax_loss.legend()
    ax_norm.legend(fontsize=8)
    fig.suptitle("Same run on 1 device, jit + NamedSharding, and shard_map (4 data x 2 model)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"plot saved to {args.out}")
    print("EQUAL" if agree else "DIFFERENT")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
