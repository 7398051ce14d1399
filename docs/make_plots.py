"""Draw the documentation's figures into docs/img/ (committed; rerun after changing this).

python docs/make_plots.py
"""

from pathlib import Path

import jax.numpy as jnp
import matplotlib
import numpy as np

import gradsafe as gs

matplotlib.use("Agg")
import matplotlib.pyplot as plt

IMG = Path(__file__).resolve().parent / "img"


def norm_trace(steps: int = 600) -> np.ndarray:
    """A synthetic gradient-norm trace: a level falling from 3 to 0.3, noise, and spikes."""
    rng = np.random.default_rng(0)
    level = 0.3 + 2.7 * np.exp(-np.arange(steps) / 150)
    norms = level * np.exp(0.25 * rng.standard_normal(steps))
    spikes = rng.choice(np.arange(50, steps), 12, replace=False)
    norms[spikes] *= rng.uniform(5, 30, spikes.size)
    return norms.astype(np.float32)


def thresholds(tx, norms: np.ndarray, read=lambda state: state.threshold) -> np.ndarray:
    """Feed a one-entry gradient with each norm through ``tx``; ``read(state)`` after each."""
    state = tx.init(jnp.zeros(1))
    out = []
    for n in norms:
        _, state = tx.update(jnp.array([n]), state)
        out.append(float(read(state)))
    return np.asarray(out)


def plot_thresholds() -> None:
    norms = norm_trace()
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.semilogy(norms, color="gray", lw=0.7, label="gradient norm")
    ax.semilogy(np.full_like(norms, 1.0), lw=1.2, label="clip_by_global_norm(1.0)")
    # ZClip's spike boundary mean + z_thresh * std (its `threshold` field is inf on calm steps).
    boundary = lambda state: state.mean + 2.5 * jnp.sqrt(state.var)
    zclip_level = thresholds(gs.zclip(max_norm=None), norms, boundary)
    ax.semilogy(zclip_level, lw=1.2, label="zclip(max_norm=None): spike boundary")
    ax.semilogy(thresholds(gs.autoclip(10.0), norms), lw=1.2, label="autoclip(10)")
    ax.set(xlabel="step", ylabel="norm", title="threshold in force at each step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(IMG / "thresholds.png", dpi=110)
    plt.close(fig)


def plot_prox() -> None:
    x = np.linspace(-3, 3, 601)
    t = 1.0
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(x, x, color="gray", lw=0.8, ls="--", label="identity")
    ax.plot(x, np.sign(x) * np.maximum(np.abs(x) - t, 0), lw=1.5, label="prox_l1, $t = 1$")
    ax.plot(x, x / (1 + t), lw=1.2, label="prox of L2 ($x / (1 + t)$)")
    ax.axvspan(-t, t, color="C0", alpha=0.08)
    ax.set(xlabel="$x = w + u$", ylabel="new weight", title="proximal steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(IMG / "prox.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    IMG.mkdir(exist_ok=True)
    plot_thresholds()
    plot_prox()
    print("wrote", sorted(p.name for p in IMG.glob("*.png")))
