"""A small Transformer language model on real text: plain AdamW against ``gs.stabilize``.

The text is the Python standard library's own source code (the ``*.py`` files at the top of
``sysconfig.get_paths()["stdlib"]``), which every Python installation has, so the demo needs no
download. The model reads bytes (a vocabulary of 256) and predicts the next one: a pre-LayerNorm
decoder-only Transformer in Flax NNX (token and position embeddings, causal self-attention and
an MLP per block).

Both runs start from the same weights, see the same batches and use AdamW at the same learning
rate, high and without warm-up:

* ``optax.adamw(lr)``;
* ``gs.stabilize(optax.adamw(lr))``: ZClip in front of AdamW, a limit on how far one step may
  move each weight (relative to the weight) after it, and a guard that refuses steps with a
  NaN or Inf loss, gradient or update.

What the script reports, and the criterion behind each verdict:

* Every run is judged on its final held-out loss (mean cross-entropy in nats per byte over
  fixed batches from text it never trains on) against the *byte-frequency baseline*, the
  entropy of the training bytes' frequencies (the loss of a model that learned only which bytes
  are common). A run **learned** if it ends below that baseline; otherwise it **failed** (also
  when a loss became NaN or Inf).
* **stabilize helped** if plain AdamW failed and stabilize learned, or both learned and
  stabilize ended at least ``MARGIN`` (5%) lower; **stabilize hurt** in the mirror cases;
  otherwise **no clear difference**. The verdict is whatever the run gives: the script exits
  with status 0 either way (1 only for a bad argument or a crash).

Every ``--log-every`` steps it logs a few chosen figures of ``gs.metrics``: the gradient norm
ZClip saw, how often it clipped (and how many of those were z-score spikes rather than its
``max_norm=1.0`` cap), how often the update limit acted, and refused steps. At the end it saves
a plot of loss, gradient norm and the clip/skip rates over steps.

Run it::

    pip install -e ".[examples]" && python examples/text_lm.py

``--quick`` is the small size used by the tests (under 3 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import gradsafe as gs

VOCAB = 256  # bytes
LEARNING_RATE = 0.1  # high for AdamW without warm-up on this model
MARGIN = 0.05  # a difference in final held-out loss below 5% is no clear difference
HELD_OUT_FRACTION = 0.1  # the last 10% of the text is never trained on
DEFAULT_OUT = Path(__file__).resolve().parent / "outputs" / "text_lm.png"


class Config(NamedTuple):
    """Sizes of one run."""

    text_bytes: int  # how much of the standard library's source to read
    context: int  # bytes per training sequence
    batch: int
    width: int  # model width
    heads: int
    layers: int
    steps: int
    eval_every: int
    eval_batches: int


QUICK = Config(1_000_000, 64, 16, 64, 4, 2, 300, 50, 4)
FULL = Config(2_000_000, 128, 16, 64, 4, 2, 1500, 100, 8)  # about 10x the quick run's work


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def read_stdlib_source(limit: int) -> np.ndarray:
    """The first ``limit`` bytes of the standard library's top-level ``*.py`` files, in name
    order (the same text on every run of one Python version)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    text = np.frombuffer(b"".join(chunks)[:limit], dtype=np.uint8)
    if text.size < limit // 2:
        raise SystemExit(f"found only {text.size} bytes of Python source under {stdlib}")
    return text


def byte_entropy(text: np.ndarray) -> float:
    """Entropy (nats per byte) of the byte frequencies: the loss of a model that knows only them."""
    counts = np.bincount(text, minlength=VOCAB).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def batches(text: np.ndarray, count: int, cfg: Config, seed: int) -> np.ndarray:
    """``count`` batches of ``cfg.context + 1`` consecutive bytes at random offsets."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, text.size - cfg.context - 1, size=(count, cfg.batch))
    return text[starts[..., None] + np.arange(cfg.context + 1)].astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class Block(nnx.Module):
    """Pre-LayerNorm Transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
        self.attention_norm = nnx.LayerNorm(width, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            heads, width, decode=False, deterministic=True, rngs=rngs
        )
        self.mlp_norm = nnx.LayerNorm(width, rngs=rngs)
        self.mlp_in = nnx.Linear(width, 4 * width, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attention(self.attention_norm(x), mask=mask)
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.mlp_norm(x))))


class ByteTransformer(nnx.Module):
    """A decoder-only Transformer over bytes: logits for the next byte at every position."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, cfg.width, rngs=rngs)
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.context, cfg.width)))
        self.blocks = nnx.List([Block(cfg.width, cfg.heads, rngs) for _ in range(cfg.layers)])
        self.final_norm = nnx.LayerNorm(cfg.width, rngs=rngs)
        self.readout = nnx.Linear(cfg.width, VOCAB, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        length = tokens.shape[-1]
        x = self.embed(tokens) + self.position[...][:length]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.readout(self.final_norm(x))


def cross_entropy(model: ByteTransformer, sequences: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy in nats."""
    logits = model(sequences[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, sequences[:, 1:]).mean()


def train_chunk(graphdef, state, chunk: jax.Array):
    """Steps over ``chunk`` (steps, batch, context + 1) in one compiled ``lax.scan``; per step:
    the loss, the gradient's global norm and gradsafe's metrics."""

    def step(state, sequences):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(cross_entropy)(model, sequences)
        optimizer.update(model, grads, value=loss)
        stats = gs.metrics(optimizer.opt_state)
        return nnx.state((model, optimizer)), (loss, gs.global_norm(grads), stats)

    return jax.lax.scan(step, state, chunk)


train_chunk_jit = jax.jit(train_chunk, static_argnums=0)


@nnx.jit
def held_out_loss(model: ByteTransformer, eval_batches: jax.Array) -> jax.Array:
    """Mean cross-entropy over fixed held-out batches."""
    return jnp.mean(jax.vmap(lambda b: cross_entropy(model, b))(eval_batches))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

# The stabilize figures logged and plotted: a few chosen ones, not every field.
CLIPPED, SPIKE, LIMITED, SKIPPED = (
    "zclip/clipped",
    "zclip/spike",
    "clip_update_relative/clipped",
    "skip_nonfinite/skipped",
)


class Run(NamedTuple):
    """Per-step records of one run."""

    loss: np.ndarray
    grad_norm: np.ndarray
    events: dict[str, np.ndarray]  # the stabilize flags above, per step (empty for plain AdamW)
    eval_steps: np.ndarray
    eval_loss: np.ndarray
    seconds: float


def train(
    name: str, tx: optax.GradientTransformation, cfg: Config, data, eval_data, log_every: int
) -> Run:
    model = ByteTransformer(cfg, nnx.Rngs(0))  # the same initial weights for every run
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    losses, norms = [], []
    eval_steps, eval_losses = [0], [float(held_out_loss(model, eval_data))]
    events: dict[str, list[bool]] = {}
    start = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc=f"{name:>16}", unit="step", disable=None)
    # Chunks of steps end at every evaluation, so the held-out loss is measured on schedule.
    for begin in range(0, cfg.steps, cfg.eval_every):
        end = min(begin + cfg.eval_every, cfg.steps)
        state, (loss, norm, stats) = train_chunk_jit(graphdef, state, data[begin:end])
        loss, norm, stats = jax.device_get((loss, norm, stats))
        for step in range(begin, end):
            losses.append(float(loss[step - begin]))
            norms.append(float(norm[step - begin]))
            for field in (CLIPPED, SPIKE, LIMITED, SKIPPED):
                if field in stats:
                    events.setdefault(field, []).append(bool(stats[field][step - begin]))
            if step % log_every == 0 or step == cfg.steps - 1:
                tqdm.write(log_line(name, step, losses[-1], norms[-1], events))
        model, _ = nnx.merge(graphdef, state)
        eval_steps.append(end)
        eval_losses.append(float(held_out_loss(model, eval_data)))
        bar.update(end - begin)
        bar.set_postfix(loss=f"{losses[-1]:.3g}", held_out=f"{eval_losses[-1]:.3g}")
    bar.close()
    return Run(
        np.asarray(losses),
        np.asarray(norms),
        {k: np.asarray(v) for k, v in events.items()},
        np.asarray(eval_steps),
        np.asarray(eval_losses),
        time.perf_counter() - start,
    )


def log_line(name: str, step: int, loss: float, norm: float, events: dict[str, list]) -> str:
    """The loss, the gradient norm and, for stabilize, the clip/limit/skip counts so far."""
    line = f"[{name}] step {step}: loss={loss:.4g}  grad_norm={norm:.4g}"
    if events:
        line += (
            f"  clipped={sum(events[CLIPPED])} (spikes={sum(events[SPIKE])})"
            f"  update_limited={sum(events[LIMITED])}  refused={sum(events[SKIPPED])}"
        )
    return line


# ----------------------------------------------------------------------------------------------
# Verdict and plot
# ----------------------------------------------------------------------------------------------


def final_held_out(run: Run) -> float:
    """The last held-out loss; NaN if any training or held-out loss was non-finite."""
    finite = np.all(np.isfinite(run.loss)) and np.all(np.isfinite(run.eval_loss))
    return float(run.eval_loss[-1]) if finite else math.nan


def learned(run: Run, baseline: float) -> bool:
    """Whether the run ended below the byte-frequency baseline (and stayed finite)."""
    loss = final_held_out(run)
    return math.isfinite(loss) and loss < baseline


def verdict(plain: Run, safe: Run, baseline: float) -> tuple[str, str]:
    """("STABILIZE HELPED" | "STABILIZE HURT" | "NO CLEAR DIFFERENCE", the reason)."""
    plain_loss, safe_loss = final_held_out(plain), final_held_out(safe)
    plain_ok, safe_ok = learned(plain, baseline), learned(safe, baseline)
    figures = (
        f"final held-out loss {plain_loss:.4g} (AdamW) vs {safe_loss:.4g} (stabilize); "
        f"byte-frequency baseline {baseline:.4g} nats/byte"
    )
    if safe_ok and not plain_ok:
        return "STABILIZE HELPED", f"only the stabilize run learned: {figures}"
    if plain_ok and not safe_ok:
        return "STABILIZE HURT", f"only plain AdamW learned: {figures}"
    if not (plain_ok or safe_ok):
        return "NO CLEAR DIFFERENCE", f"neither run learned: {figures}"
    if safe_loss <= (1 - MARGIN) * plain_loss:
        return "STABILIZE HELPED", f"both learned, stabilize >= {MARGIN:.0%} lower: {figures}"
    if plain_loss <= (1 - MARGIN) * safe_loss:
        return "STABILIZE HURT", f"both learned, AdamW >= {MARGIN:.0%} lower: {figures}"
    return "NO CLEAR DIFFERENCE", f"both learned, within {MARGIN:.0%}: {figures}"


def rate(flags: np.ndarray, window: int) -> np.ndarray:
    """Fraction of the last ``window`` steps on which ``flags`` was set."""
    counts = np.convolve(flags.astype(np.float64), np.ones(window), mode="full")[: flags.size]
    return counts / np.minimum(np.arange(1, flags.size + 1), window)


def figure(runs: dict[str, Run], baseline: float, title: str):
    """Loss, gradient norm, and what stabilize's parts did, over steps (a matplotlib Figure)."""
    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    ax_loss, ax_norm, ax_rate = axes
    looks = {"AdamW": ("C3", "-"), "stabilize(AdamW)": ("C0", "--")}
    for name, run in runs.items():
        color, style = looks[name]
        steps = np.arange(1, run.loss.size + 1)
        ax_loss.plot(steps, run.loss, color=color, lw=0.6, alpha=0.35)
        ax_loss.plot(
            run.eval_steps, run.eval_loss, color=color, ls=style, marker="o", ms=4,
            label=f"{name}: held-out",
        )  # fmt: skip
        ax_norm.semilogy(steps, run.grad_norm, color=color, ls=style, lw=0.8, label=name)
        bad = np.flatnonzero(~np.isfinite(run.loss))
        if bad.size:
            for ax in axes:
                ax.axvline(bad[0] + 1, color=color, ls=":", lw=1.2)
    ax_loss.axhline(baseline, color="0.4", ls="--", lw=1, label="byte-frequency baseline")
    ax_loss.axhline(math.log(VOCAB), color="0.7", ls=":", lw=1, label="uniform guess (ln 256)")
    ax_loss.set(ylabel="cross-entropy (nats/byte)", title="loss (thin: training, per step)")
    ax_loss.legend(fontsize=8)
    ax_norm.axhline(1.0, color="0.4", ls="--", lw=1, label="ZClip's cap (max_norm=1.0)")
    ax_norm.set(ylabel="global norm", title="gradient norm before clipping")
    ax_norm.legend(fontsize=8)
    safe = runs["stabilize(AdamW)"]
    window = max(5, safe.loss.size // 30)
    for field, label, color, style in (
        (CLIPPED, "ZClip clipped (cap or spike)", "C0", "-"),
        (SPIKE, "ZClip z-score spike", "C1", "--"),
        (LIMITED, "update limit acted", "C2", "-."),
        (SKIPPED, "step refused (non-finite)", "C3", ":"),
    ):
        ax_rate.plot(
            np.arange(1, safe.loss.size + 1), rate(safe.events[field], window),
            color=color, ls=style, lw=1.2, label=f"{label}: {int(safe.events[field].sum())} steps",
        )  # fmt: skip
    ax_rate.set(
        ylabel="fraction of steps",
        xlabel="step",
        title=f"stabilize: what acted (rate over the last {window} steps)",
        ylim=(-0.03, 1.03),
    )
    ax_rate.legend(fontsize=8)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return fig


class Data(NamedTuple):
    """Training batches, fixed held-out batches, and the baseline they are judged against."""

    train: jax.Array  # (steps, batch, context + 1) bytes
    held_out: jax.Array  # (eval_batches, batch, context + 1) bytes
    baseline: float  # byte-frequency entropy of the training text, nats per byte
    text_bytes: int


def load_data(cfg: Config) -> Data:
    """Read the text; the last HELD_OUT_FRACTION of it is held out (never trained on)."""
    text = read_stdlib_source(cfg.text_bytes)
    split = int(text.size * (1 - HELD_OUT_FRACTION))
    train_text, held_out_text = text[:split], text[split:]
    return Data(
        jnp.asarray(batches(train_text, cfg.steps, cfg, seed=1)),
        jnp.asarray(batches(held_out_text, cfg.eval_batches, cfg, seed=2)),
        byte_entropy(train_text),
        int(text.size),
    )


def compare(cfg: Config, data: Data, lr: float, log_every: int) -> dict[str, Run]:
    """Train the two runs: plain AdamW and gs.stabilize(AdamW), same start, same batches."""
    optimizers = {"AdamW": optax.adamw(lr), "stabilize(AdamW)": gs.stabilize(optax.adamw(lr))}
    return {
        name: train(name, tx, cfg, data.train, data.held_out, log_every)
        for name, tx in optimizers.items()
    }


def summary(runs: dict[str, Run], baseline: float) -> str:
    """The results table, what stabilize's parts did, and the verdict with its reason."""
    lines = [
        f"{'run':18s} {'final held-out':>15s} {'learned':>8s} {'NaN/Inf':>8s} {'time (s)':>9s}"
    ]
    for name, run in runs.items():
        nonfinite = not np.all(np.isfinite(run.loss))
        lines.append(
            f"{name:18s} {final_held_out(run):15.4f} {learned(run, baseline)!s:>8s} "
            f"{nonfinite!s:>8s} {run.seconds:9.1f}"
        )
    safe = runs["stabilize(AdamW)"]
    lines.append(
        f"stabilize: ZClip clipped {int(safe.events[CLIPPED].sum())} of {safe.loss.size} steps "
        f"({int(safe.events[SPIKE].sum())} z-score spikes, the rest above its cap of 1.0); "
        f"update limit acted on {int(safe.events[LIMITED].sum())}; "
        f"refused {int(safe.events[SKIPPED].sum())}"
    )
    label, reason = verdict(runs["AdamW"], safe, baseline)
    lines.append(f"{label}: {reason}")
    return "\n".join(lines)


def describe(cfg: Config, data: Data, lr: float) -> str:
    return (
        f"byte-level Transformer ({cfg.layers} layers, width {cfg.width}) on "
        f"{data.text_bytes / 1e6:.1f} MB of Python stdlib source, AdamW lr={lr:g}, no warm-up"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--learning-rate", type=float, default=LEARNING_RATE, help="AdamW's rate")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--log-every", type=int, default=None, help="log every N steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    parser.add_argument("--quick", action="store_true", help="the small size (for tests)")
    args = parser.parse_args(argv)
    matplotlib.use("Agg")  # the script writes files only (the notebook keeps its own backend)
    cfg = QUICK if args.quick else FULL
    if args.steps is not None:
        cfg = cfg._replace(steps=args.steps)
    log_every = args.log_every or max(1, cfg.steps // 6)
    if cfg.steps < 1:
        parser.error("--steps must be >= 1")
    if log_every < 1:
        parser.error("--log-every must be >= 1")
    if not args.learning_rate > 0:
        parser.error("--learning-rate must be > 0")

    data = load_data(cfg)
    title = describe(cfg, data, args.learning_rate)
    print(title)
    print(
        f"byte-frequency baseline: {data.baseline:.4f} nats/byte; "
        f"uniform guess: {math.log(VOCAB):.4f}"
    )
    runs = compare(cfg, data, args.learning_rate, log_every)
    print()
    print(summary(runs, data.baseline))
    fig = figure(runs, data.baseline, title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(f"plot saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
