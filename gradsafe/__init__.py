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
from gradsafe._paths import PathMask, path_mask
from gradsafe._regularization import (
    AddElasticNetState,
    AddL1State,
    AddL2State,
    ClipUpdateRelativeState,
    ProxElasticNetState,
    ProxGroupLassoState,
    ProxL1State,
    add_elastic_net,
    add_l1,
    add_l2,
    clip_update_relative,
    prox_elastic_net,
    prox_group_lasso,
    prox_l1,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveGradClipState",
    "AddElasticNetState",
    "AddL1State",
    "AddL2State",
    "ClipByBlockRmsState",
    "ClipByGlobalNormState",
    "ClipByLeafNormState",
    "ClipByValueState",
    "ClipUpdateRelativeState",
    "PathMask",
    "ProxElasticNetState",
    "ProxGroupLassoState",
    "ProxL1State",
    "adaptive_grad_clip",
    "add_elastic_net",
    "add_l1",
    "add_l2",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "clip_by_value",
    "clip_update_relative",
    "global_norm",
    "largest_leaves",
    "leaf_norms",
    "metrics",
    "path_mask",
    "prox_elastic_net",
    "prox_group_lasso",
    "prox_l1",
    "unit_axes",
]
