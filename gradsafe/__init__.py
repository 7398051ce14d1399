"""gradsafe: Optax gradient transformations that keep training alive when gradients explode."""

from gradsafe._clipping import (
    AdaptiveGradClipState,
    ClipByBlockRmsState,
    ClipByGlobalNormState,
    ClipByLeafNormState,
    ClipByValueState,
    adaptive_grad_clip,
    clip_by_block_rms,
    clip_by_global_norm,
    clip_by_leaf_norm,
    clip_by_value,
    unit_axes,
)
from gradsafe._metrics import largest_leaves, leaf_norms, metrics
from gradsafe._numerics import global_norm

__version__ = "0.1.0"

__all__ = [
    "AdaptiveGradClipState",
    "ClipByBlockRmsState",
    "ClipByGlobalNormState",
    "ClipByLeafNormState",
    "ClipByValueState",
    "adaptive_grad_clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "clip_by_value",
    "global_norm",
    "largest_leaves",
    "leaf_norms",
    "metrics",
    "unit_axes",
]
