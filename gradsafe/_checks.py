"""Argument checks: every factory validates its Python arguments here, at construction.

Each check raises ``ValueError`` naming the argument and the allowed values. Values that are only
known at run time (tracers under ``jit``/``optax.inject_hyperparams``, and schedules where
allowed) pass unchecked: the arithmetic in :mod:`gradsafe._numerics` keeps them from reversing
or amplifying a gradient instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

# The message Optax raises when a transform that needs params gets none.
NO_PARAMS_MSG = (
    "You are using a transformation that requires the current value of parameters, but you are"
    " not passing `params` when calling `update`."
)

_NORM_TYPES = (1.0, 2.0, math.inf)


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a tracer (e.g. a hyperparameter under ``inject_hyperparams`` + ``jit``)."""
    return isinstance(x, jax.core.Tracer)


def _is_real_number_dtype(dtype: Any) -> bool:
    """Integer or real floating, bfloat16 and float8 included (numpy does not count them)."""
    return bool(jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))


def check_scalar(
    name: str,
    value: Any,
    *,
    lower: float | None = 0.0,
    lower_inclusive: bool = True,
    upper: float | None = None,
    upper_inclusive: bool = True,
    allow_schedule: bool = True,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite real number in range.

    Accepted: Python numbers, NumPy/JAX scalars and arrays of shape ``()`` or ``(1,)`` of any
    integer or real floating dtype (bfloat16 included, as ``optax.inject_hyperparams`` makes
    with bfloat16 params). A ``(1,)`` value is used as a scalar (see
    :func:`gradsafe._numerics.resolve`), so the shapes of the state never depend on it.
    Schedules (when ``allow_schedule``) and traced values are accepted unchecked: they are only
    known at run time.
    """
    if callable(value):
        if not allow_schedule:
            raise ValueError(f"{name} must be a number, got a callable {value!r}")
        return
    if is_traced(value):
        return
    if isinstance(value, bool) or getattr(value, "dtype", None) == np.dtype(bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        array = np.asarray(value)
    except Exception as error:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name} must be a number, got {value!r}") from error
    if array.shape not in ((), (1,)) or not _is_real_number_dtype(array.dtype):
        raise ValueError(f"{name} must be a scalar number, got {value!r}")
    number = float(array.reshape(()).astype(np.float64))
    low = "[" if lower_inclusive else "("
    high = "]" if upper_inclusive else ")"
    bounds = f"{low}{'-inf' if lower is None else lower}, {'inf' if upper is None else upper}{high}"
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite and in {bounds}, got {value!r}")
    too_low = lower is not None and (number < lower or (not lower_inclusive and number == lower))
    too_high = upper is not None and (number > upper or (not upper_inclusive and number == upper))
    if too_low or too_high:
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")


def check_int(
    name: str,
    value: Any,
    *,
    lower: int = 0,
    upper: int | None = None,
    allow_none: bool = False,
    allow_schedule: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer in ``[lower, upper]``.

    ``None`` (when ``allow_none``), schedules (when ``allow_schedule``) and traced values are
    accepted unchecked.
    """
    if (value is None and allow_none) or (callable(value) and allow_schedule) or is_traced(value):
        return
    bounds = f"[{lower}, {'inf' if upper is None else upper}]"
    alternatives = (" or None" if allow_none else "") + (" or a schedule" if allow_schedule else "")
    message = f"{name} must be an integer in {bounds}{alternatives}, got {value!r}"
    if isinstance(value, bool) or callable(value):
        raise ValueError(message)
    array = np.asarray(value)
    if array.shape != () or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(message)
    if int(array) < lower or (upper is not None and int(array) > upper):
        raise ValueError(message)


def check_bool(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a Python or NumPy bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_transform(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an Optax gradient transformation."""
    if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        raise ValueError(f"{name} must be an optax.GradientTransformation, got {value!r}")


def check_axis_name(axis_name: Any) -> None:
    """Raise ``ValueError`` unless ``axis_name`` is None, a string or a tuple of strings."""
    names = axis_name if isinstance(axis_name, (tuple, list)) else (axis_name,)
    if axis_name is not None and not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"axis_name must be None, a mesh axis name or a tuple of them, got {axis_name!r}"
        )


def check_axis(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is None, an int or a tuple of ints (array axes)."""

    def is_int(a: Any) -> bool:
        return isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_))

    ok = value is None or is_int(value)
    ok = ok or (isinstance(value, (tuple, list)) and all(is_int(a) for a in value))
    if not ok:
        raise ValueError(f"{name} must be None, an int or a tuple of ints, got {value!r}")


def check_norm_type(norm_type: Any) -> None:
    """Raise ``ValueError`` unless ``norm_type`` is 1, 2 or inf (a traced value is checked later).

    Strings ``"inf"``/``"infinity"`` (any case) mean inf.
    """
    message = f"norm_type must be 1, 2 or inf, got {norm_type!r}"
    if isinstance(norm_type, str):
        if norm_type.lower() not in ("inf", "infinity"):
            raise ValueError(message)
        return
    if is_traced(norm_type):
        return
    if isinstance(norm_type, bool) or callable(norm_type):
        raise ValueError(message)
    try:
        value = np.asarray(norm_type)
    except Exception as error:  # pragma: no cover - exotic inputs
        raise ValueError(message) from error
    if value.shape not in ((), (1,)) or not _is_real_number_dtype(value.dtype):
        raise ValueError(message)
    if float(value.reshape(()).astype(np.float64)) not in _NORM_TYPES:
        raise ValueError(message)


def require_params(params: Any) -> None:
    """Raise Optax's ``ValueError`` when a transform that needs ``params`` gets none."""
    if params is None:
        raise ValueError(NO_PARAMS_MSG)


__all__ = [
    "NO_PARAMS_MSG",
    "check_axis",
    "check_axis_name",
    "check_bool",
    "check_choice",
    "check_int",
    "check_norm_type",
    "check_scalar",
    "check_transform",
    "is_traced",
    "require_params",
]
