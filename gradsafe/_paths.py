"""Readable parameter paths: ``("encoder", "layer_0", "kernel") -> "encoder/layer_0/kernel"``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax


def _key_str(key: Any) -> str:
    for attribute in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """Join a ``jax.tree_util`` key path into ``"a/b/0/kernel"`` (the form masks match on)."""
    return "/".join(_key_str(key) for key in path)


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """``(path string, leaf)`` for every leaf of ``tree``, in ``jax.tree.leaves`` order."""
    return [(path_str(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]
