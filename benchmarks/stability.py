"""Stability suite: which clipping methods keep small training runs alive, over a grid of LRs.

Four small tasks where gradient clipping measurably matters (the protocol of the research
notes, ``shared/research/adaptive.md`` section 15), all data generated here from seeded
random keys (no downloads):

1. ``adding_rnn`` / ``adding_irnn``: the adding problem (sequence length 100) with a vanilla
   tanh RNN (recurrent gain 1.5) and an identity-initialised ReLU RNN (IRNN), SGD momentum.
2. ``transformer``: a tiny pre-LN Transformer language model on sequences from a random sparse
   Markov chain, AdamW (b2 0.95), no warm-up.
3. ``spiky_regression``: regression with Adam where about 1% of the batches carry a 1000x
   gradient (the loss of that batch is scaled by 1000, as a corrupted batch would).
4. ``deep_mlp``: a 16-layer un-normalised ReLU MLP (He init) at batch 1024 on a Gaussian
   mixture, SGD with Nesterov momentum.
5. ``adagrad_spiky`` / ``rss_momentum_spiky``: the regression of 3 with 0.5% of the batches
   carrying a 1000x gradient, against a sum of squared gradients that never forgets:
   ``optax.adagrad``, and ``scale_by_rss`` followed by momentum (``optax.trace``).

Every task is trained with every method of ``METHODS`` over its learning-rate grid and several
seeds; the seeds and learning rates of one (task, method) pair are ``vmap``-ed and the steps run
in one ``jit``-compiled ``lax.scan``; ``SEEDS`` (6) seeds per learning rate by default: at the
edges of the stable range a run or two of each (task, method) pair land either side of the
criteria by chance, and with 3 seeds that decided several comparisons. Per method and task the
report gives:

* **diverged**: the share of runs whose final evaluation loss is non-finite or above the
  evaluation loss at initialisation (same held-out batch);
* **blew up** (a second criterion, which a run ending near its starting, chance-level loss
  does not meet on noise): final evaluation loss non-finite or above ``BLOWUP_FACTOR`` (2) x
  the loss at initialisation;
* **median final loss** over all runs (non-finite counted as +inf), and the median over seeds
  at the best learning rate;
* **stable LR range**: the widest contiguous run of grid learning rates at which no seed
  diverged (``[low, high]`` and its width in grid points);
* **loss spikes** per run: training steps whose loss exceeds 1.5x the median of the previous
  50 steps (before the first non-finite loss);
* **time per step**: wall time of the compiled run divided by steps, for all vmapped runs
  together (compilation excluded; the machine may be shared, so treat it as noisy).

Outputs: ``stability.json``, ``stability.md`` and ``stability_<task>.png`` (final loss against
LR, log axes, one line per method) in ``--out`` (default ``benchmarks/results``).

Run::

    python benchmarks/stability.py                        # full grid (about 30 min, 2 cores)
    python benchmarks/stability.py --quick --out /tmp/s   # reduced grid and methods, < 2 min
    python benchmarks/stability.py --tasks deep_mlp --methods none "gs.stabilize(opt)"
    python benchmarks/stability.py --methods "gs.split_clip()" --merge   # rerun one method
    python benchmarks/stability.py --tasks transformer --lrs 1.0 --seeds 24   # one LR
    python benchmarks/stability.py --first-seed 1000 --seeds 12   # seeds the suite never used

``--merge`` keeps the entries of the existing ``stability.json`` in ``--out`` that this run does
not produce (same grid and seeds; each entry records the date of its run, and the markdown
lists them): use it only for methods whose code, and tasks whose definition, did not change.

To add a method, add one line to ``METHODS``. Two of its rows are controls (``CONTROLS``): a
``split_clip`` that carries nothing and a ``skip_on_spike`` that never refuses take the steps
of the plain clip and of the bare optimizer in another compiled program, so the distance
between a control's counts and its original's shows how far rounding alone moves them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradsafe as gs

Optimizer = Callable[[Any], optax.GradientTransformation]  # learning rate -> optimizer
# (task optimizer, training steps) -> the method's transform; the steps let a method follow
# the run's length (a decay schedule).
Builder = Callable[[optax.GradientTransformation, int], optax.GradientTransformation]


# ----------------------------------------------------------------------------------------------
# Methods: one line each. A builder wraps the task's base optimizer.
# ----------------------------------------------------------------------------------------------


def _before(clipper: Callable[[], optax.GradientTransformation]) -> Builder:
    """A builder that puts a freshly built ``clipper`` in front of the optimizer."""
    return lambda opt, steps: optax.chain(clipper(), opt)


METHODS: dict[str, Builder] = {
    "none": lambda opt, steps: opt,
    "optax.clip_by_global_norm(1.0)": _before(lambda: optax.clip_by_global_norm(1.0)),
    "optax.adaptive_grad_clip(0.01)": _before(lambda: optax.adaptive_grad_clip(0.01)),
    "gs.clip_by_global_norm(1.0)": _before(lambda: gs.clip_by_global_norm(1.0)),
    "gs.zclip()": _before(lambda: gs.zclip()),
    "gs.autoclip()": _before(lambda: gs.autoclip()),
    "gs.adagc()": _before(lambda: gs.adagc()),
    "gs.split_clip()": _before(lambda: gs.split_clip()),
    "split_clip(max_residual_ratio=0.0) (carries nothing)": _before(
        lambda: gs.split_clip(max_residual_ratio=0.0)
    ),
    "gs.skip_on_spike(opt)": lambda opt, steps: gs.skip_on_spike(opt),
    "skip_on_spike(sigma=1e9) (never refuses)": lambda opt, steps: gs.skip_on_spike(opt, sigma=1e9),
    "gs.stabilize(opt)": lambda opt, steps: gs.stabilize(opt),
    # Gradient decay: the gradient scaled by a cosine from 1 to 0.1 over the run, before the
    # optimizer (for SGD an LR decay; Adam and AdamW divide most of it out again).
    "gs.decay(cosine) before opt": lambda opt, steps: optax.chain(
        gs.decay(optax.cosine_decay_schedule(1.0, steps, alpha=0.1)), opt
    ),
    # After the optimizer it scales the step: a cooldown of the learning rate after a spike.
    "gs.cooldown_on_spike() after opt": lambda opt, steps: optax.chain(opt, gs.cooldown_on_spike()),
}
STABILIZE = "gs.stabilize(opt)"
# Rounding twins (control -> the method whose steps it takes): a split_clip that carries
# nothing applies the plain clip's updates and a skip_on_spike that never refuses a finite
# step applies the bare optimizer's, each compiled inside another program. How far a twin's
# counts land from its method's is what rounding alone does to a chaotic run.
CONTROLS = {
    "split_clip(max_residual_ratio=0.0) (carries nothing)": "gs.clip_by_global_norm(1.0)",
    "skip_on_spike(sigma=1e9) (never refuses)": "none",
}
# seeds per learning rate of a full run (see the module notes)
SEEDS = 6
# --quick trains these only (compilation dominates a small run); the tests build every method.
QUICK_METHODS = ("none", "optax.clip_by_global_norm(1.0)", STABILIZE)
# --quick compiles without XLA's backend optimisations: about 3x faster to compile, slower to run.
QUICK_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


# ----------------------------------------------------------------------------------------------
# Tasks. Parameters and data are drawn with numpy outside the compiled function (random-number
# kernels inside a scan make XLA's CPU compile several times slower); every seed gets its own
# initialisation, training batches and held-out batch.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One training problem.

    ``init(rng) -> params`` and ``data(rng, steps) -> (train, held_out)`` draw from a numpy
    ``Generator``; ``train`` has a leading axis of ``steps`` (one batch per step).
    ``train_loss(params, batch) -> (loss, clean_loss)``: ``loss`` is differentiated and given
    to the optimizer as ``value``; ``clean_loss`` (the loss without injected spikes) is
    recorded. ``eval_loss(params, held_out)`` is measured before and after training.
    """

    name: str
    description: str
    optimizer: Optimizer
    lrs: tuple[float, ...]
    steps: int
    init: Callable[[np.random.Generator], Any]
    data: Callable[[np.random.Generator, int], tuple[Any, Any]]
    train_loss: Callable[[Any, Any], tuple[jax.Array, jax.Array]]
    eval_loss: Callable[[Any, Any], jax.Array]
    sizes: dict[str, int] = field(default_factory=dict)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return (std * rng.standard_normal(shape)).astype(np.float32)


def _zeros(*shape: int) -> np.ndarray:
    return np.zeros(shape, np.float32)


# --- 1. adding problem ------------------------------------------------------------------------


def _adding_batches(rng: np.random.Generator, shape: tuple[int, ...], length: int):
    """Inputs (*shape, length, 2): a U(0, 1) value and a marker; target: the two marked values'
    sum. One marker in each half, so the net must carry information across the sequence."""
    values = rng.random((*shape, length), dtype=np.float32)
    first = rng.integers(0, length // 2, shape)
    second = rng.integers(length // 2, length, shape)
    positions = np.arange(length)
    markers = (positions == first[..., None]) | (positions == second[..., None])
    markers = markers.astype(np.float32)
    targets = np.sum(values * markers, axis=-1)
    return np.stack([values, markers], axis=-1), targets


def adding_task(*, relu: bool, steps: int, length: int, hidden: int, batch: int) -> Task:
    """The adding problem with a vanilla tanh RNN (``relu=False``) or an IRNN (``relu=True``)."""
    activation = jax.nn.relu if relu else jnp.tanh

    def init(rng):
        if relu:  # Le et al. 2015: identity recurrence, small input weights
            recurrent = np.eye(hidden, dtype=np.float32)
            input_std = 1e-3
        else:  # gain 1.5: the classic exploding-gradient regime (Pascanu et al. 2013)
            recurrent = _normal(rng, (hidden, hidden), 1.5 / math.sqrt(hidden))
            input_std = 1.0 / math.sqrt(2.0)
        return {
            "input": _normal(rng, (2, hidden), input_std),
            "recurrent": recurrent,
            "bias": _zeros(hidden),
            "readout": _normal(rng, (hidden, 1), 1.0 / math.sqrt(hidden)),
            "readout_bias": _zeros(1),
        }

    def data(rng, steps):
        return _adding_batches(rng, (steps, batch), length), _adding_batches(
            rng, (4 * batch,), length
        )

    def mse(params, batch_data):
        inputs, targets = batch_data

        def cell(state, x):
            pre = state @ params["recurrent"] + x @ params["input"] + params["bias"]
            return activation(pre), None

        start = jnp.zeros((inputs.shape[0], hidden), jnp.float32)
        last, _ = jax.lax.scan(cell, start, jnp.swapaxes(inputs, 0, 1))
        prediction = (last @ params["readout"] + params["readout_bias"])[:, 0]
        return jnp.mean(jnp.square(prediction - targets))

    def train_loss(params, batch_data):
        loss = mse(params, batch_data)
        return loss, loss

    kind = "IRNN (ReLU, identity init)" if relu else "vanilla tanh RNN (recurrent gain 1.5)"
    return Task(
        name="adding_irnn" if relu else "adding_rnn",
        description=f"adding problem, length {length}, {kind}, hidden {hidden}, batch {batch}, "
        "SGD momentum 0.9",
        optimizer=lambda lr: optax.sgd(lr, momentum=0.9),
        lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),
        steps=steps,
        init=init,
        data=data,
        train_loss=train_loss,
        eval_loss=mse,
        sizes={"length": length, "hidden": hidden, "batch": batch},
    )


# --- 2. tiny pre-LN Transformer LM --------------------------------------------------------------


def _markov_table(vocab: int, successors: int) -> np.ndarray:
    """Cumulative transition probabilities of a random sparse Markov chain (fixed per task):
    each token has ``successors`` possible next tokens with Dirichlet(1) probabilities."""
    rng = np.random.default_rng(1234)
    table = np.zeros((vocab, vocab))
    for token in range(vocab):
        nxt = rng.choice(vocab, size=successors, replace=False)
        table[token, nxt] = rng.dirichlet(np.ones(successors))
    return np.cumsum(table, axis=1)


def _markov_sequences(rng: np.random.Generator, cumulative: np.ndarray, shape, length: int):
    vocab = cumulative.shape[0]
    tokens = np.empty((*shape, length + 1), np.int32)
    tokens[..., 0] = rng.integers(vocab, size=shape)
    for position in range(1, length + 1):
        draws = rng.random(shape)[..., None]
        chosen = (draws > cumulative[tokens[..., position - 1]]).sum(axis=-1)
        tokens[..., position] = np.minimum(chosen, vocab - 1)
    return tokens


def transformer_task(
    *, steps: int, vocab: int, length: int, width: int, heads: int, layers: int, batch: int
) -> Task:
    """A pre-LN decoder-only Transformer LM; no warm-up, no qk-norm, no z-loss."""
    cumulative = _markov_table(vocab, successors=3)
    head_dim = width // heads

    def init(rng):
        std = 0.02
        blocks = [
            {
                "ln1_scale": np.ones((width,), np.float32),
                "ln1_bias": _zeros(width),
                "qkv": _normal(rng, (width, 3 * width), std),
                "out": _normal(rng, (width, width), std),
                "ln2_scale": np.ones((width,), np.float32),
                "ln2_bias": _zeros(width),
                "up": _normal(rng, (width, 4 * width), std),
                "up_bias": _zeros(4 * width),
                "down": _normal(rng, (4 * width, width), std),
                "down_bias": _zeros(width),
            }
            for _ in range(layers)
        ]
        return {
            "embed": _normal(rng, (vocab, width), std),
            "position": _normal(rng, (length, width), std),
            "blocks": blocks,
            "final_scale": np.ones((width,), np.float32),
            "final_bias": _zeros(width),
            "unembed": _normal(rng, (width, vocab), std),
        }

    def data(rng, steps):
        train = _markov_sequences(rng, cumulative, (steps, batch), length)
        return train, _markov_sequences(rng, cumulative, (4 * batch,), length)

    def layer_norm(x, scale, bias):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias

    causal = np.tril(np.ones((length, length), bool))

    def split_heads(t):
        return t.reshape(*t.shape[:-1], heads, head_dim)

    def logits_of(params, tokens):
        x = params["embed"][tokens] + params["position"]
        for block in params["blocks"]:
            h = layer_norm(x, block["ln1_scale"], block["ln1_bias"])
            q, k, v = (split_heads(t) for t in jnp.split(h @ block["qkv"], 3, axis=-1))
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
            scores = jnp.where(causal, scores, jnp.float32(-1e30))
            attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
            x = x + attended.reshape(x.shape) @ block["out"]
            h = layer_norm(x, block["ln2_scale"], block["ln2_bias"])
            up = jax.nn.gelu(h @ block["up"] + block["up_bias"])
            x = x + up @ block["down"] + block["down_bias"]
        x = layer_norm(x, params["final_scale"], params["final_bias"])
        return x @ params["unembed"]

    def cross_entropy(params, sequences):
        logits = logits_of(params, sequences[:, :-1])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, sequences[:, 1:]))

    def train_loss(params, sequences):
        loss = cross_entropy(params, sequences)
        return loss, loss

    return Task(
        name="transformer",
        description=f"pre-LN Transformer LM, {layers} layers, width {width}, {heads} heads, "
        f"vocab {vocab}, sequence {length}, batch {batch}; sparse Markov-chain data; "
        "AdamW (b2 0.95, weight decay 0.1), no warm-up",
        optimizer=lambda lr: optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.1),
        lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),
        steps=steps,
        init=init,
        data=data,
        train_loss=train_loss,
        eval_loss=cross_entropy,
        sizes={
            "vocab": vocab,
            "length": length,
            "width": width,
            "heads": heads,
            "layers": layers,
            "batch": batch,
        },
    )


# --- 3. regression with injected gradient spikes ------------------------------------------------


def spiky_regression_task(
    *,
    steps: int,
    dim: int,
    hidden: int,
    batch: int,
    spike_rate: float,
    spike_scale: float,
    name: str = "spiky_regression",
    optimizer: Optimizer = optax.adam,
    optimizer_text: str = "Adam",
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
) -> Task:
    """A two-layer tanh MLP regressing a fixed random teacher; a batch is a spike with
    probability ``spike_rate`` and then its loss (hence its gradient) is ``spike_scale`` x."""
    teacher = np.random.default_rng(99).standard_normal(dim).astype(np.float32) / math.sqrt(dim)

    def init(rng):
        return {
            "w1": _normal(rng, (dim, hidden), 1.0 / math.sqrt(dim)),
            "b1": _zeros(hidden),
            "w2": _normal(rng, (hidden, 1), 1.0 / math.sqrt(hidden)),
            "b2": _zeros(1),
        }

    def sample(rng, shape):
        x = rng.standard_normal((*shape, dim), dtype=np.float32)
        noise = 0.1 * rng.standard_normal(shape, dtype=np.float32)
        return x, np.sin(2.0 * (x @ teacher)) + noise

    def data(rng, steps):
        x, y = sample(rng, (steps, batch))
        factor = np.where(rng.random(steps) < spike_rate, spike_scale, 1.0).astype(np.float32)
        return (x, y, factor), sample(rng, (1024,))

    def mse(params, batch_data):
        x, y = batch_data[:2]
        hidden_out = jnp.tanh(x @ params["w1"] + params["b1"])
        prediction = (hidden_out @ params["w2"] + params["b2"])[:, 0]
        return jnp.mean(jnp.square(prediction - y))

    def train_loss(params, batch_data):
        clean = mse(params, batch_data)
        return clean * batch_data[2], clean

    return Task(
        name=name,
        description=f"2-layer tanh MLP regression (input {dim}, hidden {hidden}, batch {batch}), "
        f"{spike_rate:.1%} of batches with a {spike_scale:g}x loss and gradient; {optimizer_text}",
        optimizer=optimizer,
        lrs=lrs,
        steps=steps,
        init=init,
        data=data,
        train_loss=train_loss,
        eval_loss=mse,
        sizes={"dim": dim, "hidden": hidden, "batch": batch},
    )


# --- 5. the squared-gradient accumulator under rare spikes ---------------------------------------


def rss_momentum(lr: Any) -> optax.GradientTransformation:
    """Accumulate g^2, divide by its root (eps inside the root), then momentum 0.9 and the LR:
    the Adagrad-style optimizer with momentum built from Optax pieces."""
    return optax.chain(
        optax.scale_by_rss(initial_accumulator_value=0.1, eps=1e-7),
        optax.trace(decay=0.9),
        optax.scale_by_learning_rate(lr),
    )


ACCUMULATOR_LRS = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
# Momentum adds about a factor 10 to the step: the grid one decade lower.
MOMENTUM_ACCUMULATOR_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def accumulator_tasks(*, steps: int, dim: int, hidden: int, batch: int) -> list[Task]:
    """Rare 1000x gradient spikes (0.5% of batches) against a sum of squared gradients that
    never forgets: ``optax.adagrad``, and the same accumulator with momentum."""
    common = {"steps": steps, "dim": dim, "hidden": hidden, "batch": batch, "spike_rate": 0.005}
    return [
        spiky_regression_task(
            **common,
            spike_scale=1e3,
            name="adagrad_spiky",
            optimizer=optax.adagrad,
            optimizer_text="optax.adagrad",
            lrs=ACCUMULATOR_LRS,
        ),
        spiky_regression_task(
            **common,
            spike_scale=1e3,
            name="rss_momentum_spiky",
            optimizer=rss_momentum,
            optimizer_text="scale_by_rss + trace(0.9) + learning rate",
            lrs=MOMENTUM_ACCUMULATOR_LRS,
        ),
    ]


# --- 4. deep un-normalised ReLU MLP at large batch ---------------------------------------------


def deep_mlp_task(
    *, steps: int, depth: int, width: int, dim: int, classes: int, batch: int
) -> Task:
    """A ``depth``-layer ReLU MLP, He init, no normalisation, on a Gaussian mixture."""
    means = 0.5 * np.random.default_rng(7).standard_normal((classes, dim)).astype(np.float32)

    def init(rng):
        sizes = [dim] + [width] * (depth - 1) + [classes]
        layers = []
        for index in range(depth):
            fan_in, fan_out = sizes[index], sizes[index + 1]
            std = math.sqrt(2.0 / fan_in) if index < depth - 1 else 1.0 / math.sqrt(fan_in)
            layers.append({"w": _normal(rng, (fan_in, fan_out), std), "b": _zeros(fan_out)})
        return layers

    def sample(rng, shape):
        labels = rng.integers(0, classes, shape).astype(np.int32)
        return means[labels] + rng.standard_normal((*shape, dim), dtype=np.float32), labels

    def data(rng, steps):
        return sample(rng, (steps, batch)), sample(rng, (2048,))

    def cross_entropy(params, batch_data):
        x, labels = batch_data
        for layer in params[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        logits = x @ params[-1]["w"] + params[-1]["b"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    def train_loss(params, batch_data):
        loss = cross_entropy(params, batch_data)
        return loss, loss

    return Task(
        name="deep_mlp",
        description=f"{depth}-layer ReLU MLP (width {width}, He init, no normalisation), "
        f"{classes}-class Gaussian mixture in {dim}-D, batch {batch}; SGD Nesterov 0.9",
        optimizer=lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
        lrs=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
        steps=steps,
        init=init,
        data=data,
        train_loss=train_loss,
        eval_loss=cross_entropy,
        sizes={"depth": depth, "width": width, "dim": dim, "batch": batch},
    )


def build_tasks(quick: bool) -> list[Task]:
    if quick:
        return [
            adding_task(relu=False, steps=30, length=100, hidden=16, batch=16),
            adding_task(relu=True, steps=30, length=100, hidden=16, batch=16),
            transformer_task(steps=30, vocab=16, length=16, width=16, heads=2, layers=2, batch=8),
            spiky_regression_task(
                steps=100, dim=16, hidden=16, batch=32, spike_rate=0.05, spike_scale=1e3
            ),
            deep_mlp_task(steps=30, depth=16, width=16, dim=16, classes=10, batch=256),
            *accumulator_tasks(steps=100, dim=16, hidden=16, batch=32),
        ]
    return [
        adding_task(relu=False, steps=400, length=100, hidden=32, batch=32),
        adding_task(relu=True, steps=400, length=100, hidden=32, batch=32),
        transformer_task(steps=200, vocab=32, length=32, width=32, heads=2, layers=2, batch=16),
        spiky_regression_task(
            steps=2000, dim=64, hidden=64, batch=64, spike_rate=0.01, spike_scale=1e3
        ),
        deep_mlp_task(steps=300, depth=16, width=32, dim=32, classes=10, batch=1024),
        *accumulator_tasks(steps=1000, dim=32, hidden=32, batch=64),
    ]


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def make_run(task: Task, builder: Builder) -> Callable[..., Any]:
    """A jitted ``(lrs, params, train, held_out) -> (losses, initial, final)``: the seeds
    (leading axis of params and data) and the learning rates are both vmapped; outputs have
    shape ``(seeds, lrs, ...)``."""

    def one(lr, params, train, held_out):
        tx = optax.with_extra_args_support(builder(task.optimizer(lr), task.steps))
        opt_state = tx.init(params)
        grad_fn = jax.value_and_grad(task.train_loss, has_aux=True)

        def step(carry, batch_data):
            params, opt_state = carry
            (loss, clean), grads = grad_fn(params, batch_data)
            updates, opt_state = tx.update(grads, opt_state, params, value=loss)
            return (optax.apply_updates(params, updates), opt_state), clean

        (final_params, _), losses = jax.lax.scan(step, (params, opt_state), train)
        initial = task.eval_loss(params, held_out)
        return losses, initial, task.eval_loss(final_params, held_out)

    over_lrs = jax.vmap(one, in_axes=(0, None, None, None))
    return jax.jit(jax.vmap(over_lrs, in_axes=(None, 0, 0, 0)))


def draw(task: Task, seeds: int, first_seed: int = 0) -> tuple[Any, Any, Any]:
    """Initial parameters, training batches and held-out batch for each seed (``first_seed``
    and the ``seeds - 1`` after it), stacked."""
    drawn = []
    for seed in range(first_seed, first_seed + seeds):
        rng = np.random.default_rng([2026, seed])
        params = task.init(rng)
        drawn.append((params, *task.data(rng, task.steps)))
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *drawn)


def count_spikes(losses: np.ndarray, window: int = 50, factor: float = 1.5) -> np.ndarray:
    """Per run: steps whose loss exceeds ``factor`` x the median of the previous ``window``
    losses, counted up to the first non-finite loss."""
    runs, steps = losses.shape
    if steps <= window:
        return np.zeros(runs, np.int64)
    history = np.lib.stride_tricks.sliding_window_view(losses[:, :-1], window, axis=1)
    medians = np.median(history, axis=-1)  # (runs, steps - window): previous `window` losses
    current = losses[:, window:]
    finite_so_far = np.cumprod(np.isfinite(losses), axis=1)[:, window:].astype(bool)
    with np.errstate(invalid="ignore"):
        spikes = (current > factor * medians) & finite_so_far
    return spikes.sum(axis=1)


def stable_range(diverged_any: np.ndarray) -> tuple[int, int] | None:
    """Indices ``(first, last)`` of the longest contiguous run of LRs with no divergence (ties:
    the higher LRs), or None when every LR diverged."""
    best: tuple[int, int] | None = None
    start = None
    for index, bad in enumerate([*diverged_any.tolist(), True]):
        if not bad and start is None:
            start = index
        elif bad and start is not None:
            if best is None or index - start >= best[1] - best[0] + 1:
                best = (start, index - 1)
            start = None
    return best


# Second divergence criterion. "Final loss above the initial loss" flips on noise for a run
# that ends near its starting (chance) level; a run "blew up" only when its final held-out loss
# is non-finite or more than this many times its held-out loss at initialisation.
BLOWUP_FACTOR = 2.0


def blowup_fields(lrs: tuple[float, ...], final: np.ndarray, initial: np.ndarray) -> dict:
    """The report fields of the blow-up criterion for final/initial losses of shape (lrs,
    seeds): per-run flags, their count and rate, and the stable LR range under it."""
    with np.errstate(invalid="ignore"):
        blew_up = ~np.isfinite(final) | (final > BLOWUP_FACTOR * initial)
    span = stable_range(blew_up.any(axis=1))
    return {
        "blowup_rate": float(blew_up.mean()),
        "blown_up_runs": int(blew_up.sum()),
        "blown_up": blew_up.tolist(),
        "no_blowup_lr_range": None if span is None else [lrs[span[0]], lrs[span[1]]],
        "no_blowup_lr_points": 0 if span is None else span[1] - span[0] + 1,
    }


def evaluate(
    task: Task, name: str, seeds: int, drawn: Any, compiler_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train every (seed, LR) pair of ``task`` with method ``name``; the method's report."""
    lrs = jnp.asarray(task.lrs, jnp.float32)
    run = make_run(task, METHODS[name])
    start = time.perf_counter()
    compiled = run.lower(lrs, *drawn).compile(compiler_options)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    losses, initial, final = jax.block_until_ready(compiled(lrs, *drawn))
    run_s = time.perf_counter() - start
    # (seeds, lrs) -> (lrs, seeds)
    losses, initial, final = (
        np.swapaxes(np.asarray(x, np.float64), 0, 1) for x in (losses, initial, final)
    )

    diverged = ~np.isfinite(final) | (final > initial)
    final_inf = np.where(np.isfinite(final), final, np.inf)
    per_lr_median = np.median(final_inf, axis=1)
    best = int(np.argmin(per_lr_median))
    span = stable_range(diverged.any(axis=1))
    return {
        "divergence_rate": float(diverged.mean()),
        "diverged_runs": int(diverged.sum()),
        "runs": int(diverged.size),
        **blowup_fields(task.lrs, final, initial),
        "median_final_loss": float(np.median(final_inf)),
        "best_lr": task.lrs[best],
        "best_lr_median_final_loss": float(per_lr_median[best]),
        "stable_lr_range": None if span is None else [task.lrs[span[0]], task.lrs[span[1]]],
        "stable_lr_points": 0 if span is None else span[1] - span[0] + 1,
        "spikes_per_run": float(count_spikes(losses.reshape(-1, task.steps)).mean()),
        "ms_per_step": 1e3 * run_s / task.steps,
        "compile_s": compile_s,
        "median_initial_loss": float(np.median(initial)),
        "initial_loss": initial.tolist(),
        "final_loss": [[_json_float(v) for v in row] for row in final.tolist()],
        "diverged": diverged.tolist(),
        "median_final_loss_per_lr": [_json_float(v) for v in per_lr_median.tolist()],
    }


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with the (task, method) entries of ``old`` that ``new`` did not run.

    Only for results of the same grid (quick flag, seeds, and per task the same learning
    rates and steps): a kept entry is the number an earlier run produced, so use it only when
    that method's code did not change since. Every entry records the date of its run. Entries
    from reports older than the blow-up criterion get its fields from their stored final
    losses and the initial losses of the new run (the same seeded draw: checked).
    """
    for key in ("quick", "seeds", "first_seed"):
        # reports from before --first-seed drew their seeds from 0
        before, after = old.get(key, 0), new.get(key, 0)
        if before != after:
            raise ValueError(f"cannot merge: {key} differs ({before!r} vs {after!r})")
    merged = dict(new)
    merged["tasks"] = {}
    order = list(METHODS)
    names = set(new["methods"]) | set(old["methods"])
    merged["methods"] = [m for m in order if m in names]
    for task_name in dict.fromkeys([*old["tasks"], *new["tasks"]]):
        fresh = new["tasks"].get(task_name)
        kept = old["tasks"].get(task_name)
        if fresh is None:
            merged["tasks"][task_name] = kept
            continue
        entry = dict(fresh)
        methods = dict(fresh["methods"])
        if kept is not None:
            if kept["lrs"] != fresh["lrs"] or kept["steps"] != fresh["steps"]:
                raise ValueError(f"cannot merge {task_name}: its grid changed")
            initial = np.asarray(next(iter(fresh["methods"].values()))["initial_loss"])
            for name, result in kept["methods"].items():
                if name in methods:
                    continue
                result = dict(result)
                result.setdefault("date", old["date"])
                if "blown_up" not in result:
                    if not math.isclose(
                        float(np.median(initial)), result["median_initial_loss"], rel_tol=1e-5
                    ):
                        raise ValueError(f"cannot merge {task_name}: initial losses differ")
                    final = np.asarray([[float(v) for v in row] for row in result["final_loss"]])
                    result.update(blowup_fields(tuple(fresh["lrs"]), final, initial))
                methods[name] = result
        entry["methods"] = {m: methods[m] for m in merged["methods"] if m in methods}
        merged["tasks"][task_name] = entry
    merged["merged"] = True
    return merged


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def _lr(value: float) -> str:
    return f"{value:g}"


def _range(entry: dict[str, Any]) -> str:
    span = entry["stable_lr_range"]
    if span is None:
        return "none"
    return f"{_lr(span[0])}–{_lr(span[1])} ({entry['stable_lr_points']})"


def _loss(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "inf"


def _seed_span(report: dict[str, Any]) -> str:
    first = report.get("first_seed", 0)
    return f" (seeds {first}-{first + report['seeds'] - 1})" if first else ""


def markdown(report: dict[str, Any]) -> str:
    tasks = report["tasks"]
    methods = report["methods"]
    lines = [
        "# Stability benchmark",
        "",
        f"Generated by `benchmarks/stability.py{' --quick' if report['quick'] else ''}` on "
        f"{report['date']} ({report['platform']}, {report['cpu_count']} CPUs, jax "
        f"{report['jax']}, optax {report['optax']}). {report['seeds']} seeds per learning rate"
        f"{_seed_span(report)}.",
        "",
        "Two divergence criteria. A run **diverged** when its final held-out loss is "
        "non-finite or above the held-out loss at initialisation (a run that ends near its "
        "starting, chance-level loss can fall either side of this on noise). A run **blew up** "
        "when its final held-out loss is non-finite or above "
        f"{BLOWUP_FACTOR:g}x its held-out loss at initialisation. **Stable LR range**: the "
        "widest contiguous run of grid learning rates where no seed diverged (grid points in "
        "brackets). Time per step is the wall time of all vmapped runs of one method together, "
        "measured on a shared machine: noisy, compare only within a task.",
        "",
    ]
    dates = sorted(
        {e.get("date", report["date"]) for t in tasks.values() for e in t["methods"].values()}
    )
    if len(dates) > 1:
        lines += [
            "Merged results (`--merge`): entries come from runs on "
            + ", ".join(dates)
            + " (each entry's `date` in `stability.json`); an entry was kept from an earlier "
            "run only where its method's code and its task did not change since.",
            "",
        ]
        for task_name, task in tasks.items():
            by_date: dict[str, list[str]] = {}
            for name, e in task["methods"].items():
                by_date.setdefault(e.get("date", report["date"]), []).append(f"`{name}`")
            if len(by_date) > 1:
                lines += [
                    f"- `{task_name}`: "
                    + "; ".join(f"{d}: {', '.join(ns)}" for d, ns in sorted(by_date.items()))
                ]
        lines.append("")
    lines += [
        "## Summary: stable LR range (diverged, blew up)",
        "",
        "| method | " + " | ".join(f"`{t}`" for t in tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for name in methods:
        cells = []
        for task in tasks.values():
            entry = task["methods"].get(name)
            if entry is None:
                cells.append("not run")
                continue
            widest = max(e["stable_lr_points"] for e in task["methods"].values())
            text = f"{_range(entry)}, {entry['divergence_rate']:.0%}, {entry['blowup_rate']:.0%}"
            cells.append(f"**{text}**" if entry["stable_lr_points"] == widest else text)
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += ["", "Bold: widest (or tied-widest) stable range on that task.", ""]
    twins = [(control, CONTROLS[control]) for control in methods if control in CONTROLS]
    if twins:
        lines += [
            "Controls: "
            + "; ".join(f"`{control}` takes the steps of `{of}`" for control, of in twins)
            + ", compiled inside another program. Where a control's counts differ from those "
            "of the method it copies, that difference is what rounding alone does to a chaotic "
            "run: a difference between two methods no larger than that is not evidence.",
            "",
        ]
    for task_name, task in tasks.items():
        lines += [
            f"## `{task_name}`",
            "",
            f"{task['description']}; {task['steps']} steps; LR grid "
            + ", ".join(_lr(v) for v in task["lrs"])
            + ".",
            "",
            "| method | diverged | blew up | median final loss | best LR (median loss) "
            "| stable LR range | loss spikes / run | ms / step |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name in methods:
            e = task["methods"].get(name)
            if e is None:
                continue
            lines.append(
                f"| `{name}` | {e['diverged_runs']}/{e['runs']} | {e['blown_up_runs']} "
                f"| {_loss(e['median_final_loss'])} "
                f"| {_lr(e['best_lr'])} ({_loss(e['best_lr_median_final_loss'])}) "
                f"| {_range(e)} | {e['spikes_per_run']:.2f} | {e['ms_per_step']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(task_name: str, task: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = task["lrs"]
    ceiling = 10.0 * max(e["median_initial_loss"] for e in task["methods"].values())
    styles = ["-", "--", "-.", ":"]
    figure, axes = plt.subplots(figsize=(8, 5.5))
    for index, (name, entry) in enumerate(task["methods"].items()):
        values = np.array([float(v) for v in entry["median_final_loss_per_lr"]])
        shown = np.where(np.isfinite(values), np.minimum(values, ceiling), ceiling)
        offset = 1.0 + 0.012 * (index - len(task["methods"]) / 2)  # separate overlapping lines
        (line,) = axes.plot(
            np.asarray(lrs) * offset,
            shown,
            styles[index % len(styles)],
            marker="o",
            markersize=4,
            label=name,
            linewidth=2.2 if name == STABILIZE else 1.2,
        )
        diverged = np.asarray(entry["diverged"]).any(axis=1)
        axes.scatter(
            np.asarray(lrs)[diverged] * offset,
            shown[diverged],
            marker="x",
            s=60,
            color=line.get_color(),
        )
    initial = np.median([e["median_initial_loss"] for e in task["methods"].values()])
    axes.axhline(initial, color="grey", linewidth=0.8, linestyle=":", label="initial loss")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("final held-out loss (median over seeds)")
    axes.set_title(
        f"{task_name}: final loss vs LR (x: some seed diverged; non-finite drawn at {ceiling:.3g})",
        fontsize=9,
    )
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


_FIRST_SEED_HELP = "draw seeds first_seed, first_seed + 1, ... (default 0: the suite's seeds)"


def run_variants(
    variants: dict[str, Builder],
    argv: list[str] | None,
    *,
    description: str,
    tasks: Sequence[str],
    out: Path,
    seeds: int = SEEDS,
    lrs: Sequence[float] = (),
) -> int:
    """Train ``tasks`` with the methods ``variants`` (name -> builder) and write the suite's
    report to ``out``: the command line of the scripts that compare settings of one method
    (``--tasks``, ``--seeds``, ``--first-seed``, ``--lrs``, ``--variants``, ``--out``);
    ``argv`` None reads ``sys.argv``; ``lrs``: only these learning rates of each grid
    (default: all)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tasks", nargs="*", default=list(tasks), help="only these tasks")
    parser.add_argument("--seeds", type=int, default=seeds, help=f"seeds per LR (default {seeds})")
    parser.add_argument("--first-seed", type=int, default=0, help=_FIRST_SEED_HELP)
    parser.add_argument("--lrs", nargs="*", type=float, default=list(lrs), help="only these LRs")
    parser.add_argument("--variants", nargs="*", default=list(variants), help="only these")
    parser.add_argument("--out", default=str(out))
    args = parser.parse_args(argv)
    unknown = set(args.variants) - set(variants)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {list(variants)}")
    for name in args.variants:
        METHODS[name] = variants[name]
    forwarded = ["--seeds", str(args.seeds), "--first-seed", str(args.first_seed)]
    forwarded += ["--out", args.out, "--tasks", *args.tasks]
    if args.lrs:
        forwarded += ["--lrs", *map(str, args.lrs)]
    return main([*forwarded, "--methods", *args.variants])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced grid (tests)")
    parser.add_argument("--out", "--out-dir", dest="out", default=None, help="output folder")
    parser.add_argument(
        "--seeds", type=int, default=None, help=f"seeds per LR (default {SEEDS}, quick 2)"
    )
    parser.add_argument("--first-seed", type=int, default=0, help=_FIRST_SEED_HELP)
    parser.add_argument("--tasks", nargs="*", default=None, help="only these tasks")
    parser.add_argument("--methods", nargs="*", default=None, help="only these methods")
    parser.add_argument(
        "--lrs", nargs="*", type=float, default=None, help="only these LRs of each task's grid"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the entries of --out's stability.json that this run does not produce "
        "(same grid; only for methods whose code did not change since that run)",
    )
    args = parser.parse_args(argv)

    if args.first_seed < 0:
        parser.error(f"--first-seed must be >= 0, got {args.first_seed}")
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds or (2 if args.quick else SEEDS)
    tasks = build_tasks(args.quick)
    if args.quick:  # reduced grid: three learning rates per task (and QUICK_METHODS)
        tasks = [replace(t, lrs=(t.lrs[0], t.lrs[len(t.lrs) // 2], t.lrs[-1])) for t in tasks]
    if args.tasks:
        unknown = set(args.tasks) - {t.name for t in tasks}
        if unknown:
            parser.error(f"unknown tasks {sorted(unknown)}; known: {[t.name for t in tasks]}")
        tasks = [t for t in tasks if t.name in args.tasks]
    if args.lrs:
        if args.merge:
            parser.error("--merge needs each task's whole grid: leave out --lrs")
        tasks = [replace(t, lrs=tuple(lr for lr in t.lrs if lr in args.lrs)) for t in tasks]
        empty = [t.name for t in tasks if not t.lrs]
        if empty:
            parser.error(f"none of --lrs {args.lrs} is in the grid of {empty}")
    methods = args.methods or list(QUICK_METHODS if args.quick else METHODS)
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; known: {list(METHODS)}")

    report: dict[str, Any] = {
        "quick": args.quick,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "seeds": seeds,
        "first_seed": args.first_seed,
        "methods": methods,
        "tasks": {},
    }
    started = time.perf_counter()
    for task in tasks:
        entry = {
            "description": task.description,
            "steps": task.steps,
            "lrs": list(task.lrs),
            "sizes": task.sizes,
            "methods": {},
        }
        drawn = draw(task, seeds, args.first_seed)
        for name in methods:
            options = QUICK_COMPILER_OPTIONS if args.quick else None
            result = evaluate(task, name, seeds, drawn, options)
            result["date"] = report["date"]
            entry["methods"][name] = result
            print(
                f"{task.name:>16} {name:<32} diverged {result['diverged_runs']:>2}/"
                f"{result['runs']:<2} median loss {_loss(result['median_final_loss']):>8} "
                f"stable {_range(result):<20} spikes {result['spikes_per_run']:5.2f} "
                f"{result['ms_per_step']:7.2f} ms/step (compile {result['compile_s']:.1f} s, "
                f"total {time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        report["tasks"][task.name] = entry
    report["seconds"] = time.perf_counter() - started
    if args.merge and (out / "stability.json").exists():
        report = merge(json.loads((out / "stability.json").read_text()), report)

    (out / "stability.json").write_text(json.dumps(report, indent=1))
    (out / "stability.md").write_text(markdown(report))
    for task_name, task in report["tasks"].items():
        plot(task_name, task, out / f"stability_{task_name}.png")
    print(
        f"wrote {out}/stability.json, stability.md and {len(report['tasks'])} plots "
        f"in {report['seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
