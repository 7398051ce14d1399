"""One matrix of the rules every public transform follows (design notes, section 2).

Driven by :data:`MATRIX`, one entry per public factory of ``gradsafe.__all__`` (a public factory
without an entry fails :func:`test_every_public_factory_has_an_entry`). Each entry gives the
factory's non-numeric arguments (an inner optimizer, rules), its numeric hyperparameters
and the bad values of each numeric argument. For every transform:

* three steps under ``lax.scan`` in ``jit``, with float hyperparameters given as arrays of shape
  ``(1,)``, keep the state's structure, shapes and dtypes, and equal three eager steps (with
  shape ``()`` arrays);
* ``optax.inject_hyperparams(factory)`` (float hyperparameters injected; integer ones, which
  count steps or size buffers, static) runs under ``jit`` with float32 and with bfloat16
  params, gives the non-injected numbers in float32, and keeps each update's dtype;
* ``jit(update)`` on params and gradients sharded over an explicit-sharding mesh
  (``AxisType.Explicit``) runs and equals the unsharded step;
* an empty tree goes through ``init`` and ``update``; each bad argument raises a
  ``ValueError`` naming it; ``jax.grad`` through ``update`` is finite at zero gradients.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from public_api import NOT_TRANSFORMS, public_factories

import gradsafe as gs

NAN, INF = math.nan, math.inf


@dataclass(frozen=True)
class Entry:
    factory: Callable[..., optax.GradientTransformation]
    # Non-numeric arguments (transforms, rules), passed as they are (static under injection).
    fixed: Callable[[], dict[str, Any]] = dict
    # Float hyperparameters: arrays under scan, injected by inject_hyperparams.
    floats: dict[str, float] = field(default_factory=dict)
    # Integer hyperparameters (step counts, windows, intervals): static under injection.
    ints: dict[str, int] = field(default_factory=dict)
    # argument -> values that must raise a ValueError naming the argument.
    bad: dict[str, list[Any]] = field(default_factory=dict)

    def kwargs(self, floats: dict[str, Any] | None = None) -> dict[str, Any]:
        return {**self.fixed(), **self.ints, **(self.floats if floats is None else floats)}

    def make(self, **floats: Any) -> optax.GradientTransformation:
        return self.factory(**self.kwargs(floats or None))


def _sgd() -> optax.GradientTransformation:
    return optax.sgd(0.1)


NEGATIVE = [-1.0, NAN, INF]  # for arguments that must be finite and >= 0
POSITIVE = [-1.0, 0.0, NAN]  # for arguments that must be > 0
BELOW_ONE = [-0.1, 1.0, NAN]  # for rates in [0, 1)

MATRIX: dict[str, Entry] = {
    "accumulate": Entry(
        gs.accumulate,
        fixed=lambda: {"inner": _sgd()},
        ints={"every_k": 2},
        bad={"every_k": [0, 1.5], "inner": ["sgd"]},
    ),
    "adagc": Entry(
        gs.adagc,
        floats={"relative": 1.04, "beta": 0.99, "warmup_max_norm": 1.0, "eps": 1e-6},
        ints={"warmup_steps": 2},
        bad={
            "relative": POSITIVE,
            "beta": BELOW_ONE,
            "warmup_max_norm": NEGATIVE,
            "eps": POSITIVE,
            "warmup_steps": [-1, 1.5],
            "scope": ["tensor"],
        },
    ),
    "adaptive_grad_clip": Entry(
        gs.adaptive_grad_clip,
        floats={"clipping": 0.05, "eps": 1e-3},
        bad={"clipping": NEGATIVE, "eps": [-1.0, NAN], "axis": ["x"]},
    ),
    "add_elastic_net": Entry(
        gs.add_elastic_net, floats={"l1": 1e-2, "l2": 1e-2}, bad={"l1": NEGATIVE, "l2": NEGATIVE}
    ),
    "add_l1": Entry(gs.add_l1, floats={"weight": 1e-2}, bad={"weight": NEGATIVE}),
    "add_l2": Entry(gs.add_l2, floats={"weight": 1e-2}, bad={"weight": NEGATIVE}),
    "autoclip": Entry(
        gs.autoclip,
        floats={"percentile": 25.0},
        ints={"window": 4},
        bad={"percentile": [-1.0, 101.0, NAN], "window": [0, 1.5]},
    ),
    "clip_by_block_rms": Entry(
        gs.clip_by_block_rms, floats={"threshold": 0.5}, bad={"threshold": NEGATIVE}
    ),
    "clip_by_global_norm": Entry(
        gs.clip_by_global_norm,
        floats={"max_norm": 1.0},
        bad={"max_norm": NEGATIVE, "norm_type": [3, 0, 0.5, "two"], "semantics": ["keras"]},
    ),
    "clip_by_leaf_norm": Entry(
        gs.clip_by_leaf_norm, floats={"max_norm": 1.0}, bad={"max_norm": NEGATIVE}
    ),
    "clip_by_value": Entry(
        gs.clip_by_value, floats={"max_delta": 0.5}, bad={"max_delta": NEGATIVE}
    ),
    "clip_update_relative": Entry(
        gs.clip_update_relative,
        floats={"relative": 0.1, "absolute": 1e-3},
        bad={"relative": NEGATIVE, "absolute": NEGATIVE},
    ),
    "cooldown_on_spike": Entry(
        gs.cooldown_on_spike,
        floats={"z_thresh": 2.0, "factor": 0.1, "alpha": 0.9},
        ints={"recovery_steps": 3, "warmup_steps": 1},
        bad={
            "z_thresh": POSITIVE,
            "factor": [-0.1, 1.5, NAN],
            "alpha": [0.0, 1.0, NAN],
            "recovery_steps": [-1, 1.5],
            "warmup_steps": [0, 1.5],
        },
    ),
    "decay": Entry(gs.decay, floats={"schedule": 0.9}, bad={"schedule": [NAN, INF]}),
    "dynamic_loss_scale": Entry(
        gs.dynamic_loss_scale,
        fixed=lambda: {"inner": _sgd()},
        floats={
            "init_scale": 1024.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "min_scale": 1.0,
        },
        ints={"growth_interval": 2, "hysteresis": 1},
        bad={
            "init_scale": POSITIVE,
            "growth_factor": [0.5, NAN],
            "backoff_factor": [0.0, 1.5, NAN],
            "min_scale": NEGATIVE,
            "growth_interval": [0, 1.5],
            "hysteresis": [0, 1.5],
            "inner": [None],
        },
    ),
    "prox_elastic_net": Entry(
        gs.prox_elastic_net,
        floats={"l1reg": 0.05, "l2reg": 0.05, "learning_rate": 0.1},
        bad={"l1reg": NEGATIVE, "l2reg": NEGATIVE, "learning_rate": NEGATIVE},
    ),
    "prox_group_lasso": Entry(
        gs.prox_group_lasso,
        floats={"l2reg": 0.05, "learning_rate": 0.1},
        bad={"l2reg": NEGATIVE, "learning_rate": NEGATIVE},
    ),
    "prox_l1": Entry(
        gs.prox_l1,
        floats={"l1reg": 0.05, "learning_rate": 0.1},
        bad={"l1reg": NEGATIVE, "learning_rate": NEGATIVE},
    ),
    "skip_nonfinite": Entry(
        gs.skip_nonfinite, fixed=lambda: {"inner": _sgd()}, bad={"inner": ["sgd", None]}
    ),
    "skip_on_spike": Entry(
        gs.skip_on_spike,
        fixed=lambda: {"inner": _sgd()},
        floats={"sigma": 3.0},
        ints={"window": 4, "min_history": 2, "max_consecutive_skips": 2},
        bad={
            "sigma": POSITIVE,
            "window": [1, 1.5],
            "min_history": [1, 5],
            "max_consecutive_skips": [0, 1.5],
            "watch": [("grad",)],
        },
    ),
    "spike_clip": Entry(
        gs.spike_clip,
        floats={"threshold": 4.0, "beta2": 0.9},
        ints={"warmup_steps": 2},
        bad={
            "threshold": POSITIVE,
            "beta2": BELOW_ONE,
            "warmup_steps": [-1, 1.5],
            "reset_interval": [0, 1.5],
        },
    ),
    "split_by_path": Entry(
        gs.split_by_path,
        fixed=lambda: {"rules": {"w$": gs.clip_by_global_norm(1.0)}, "default": _sgd()},
        bad={"default": ["identity"], "rules": [{3: _sgd()}, {"w$": "sgd"}]},
    ),
    "split_clip": Entry(
        gs.split_clip,
        fixed=lambda: {"clipper": gs.clip_by_global_norm(1.0)},
        floats={
            "residual_decay": 0.9,
            "max_residual_ratio": 2.0,
            "max_residual_norm": 5.0,
            "clip_rate_decay": 0.9,
            "explosion_ratio": 4.0,
        },
        bad={
            "residual_decay": [-0.1, 1.5, NAN],
            "clip_rate_decay": BELOW_ONE,
            "explosion_ratio": [0.5, NAN, INF],
            "max_residual_ratio": NEGATIVE,
            "max_residual_norm": NEGATIVE,
            "clipper": ["clip"],
            "release": ["never"],
        },
    ),
    "split_magnitude": Entry(
        gs.split_magnitude,
        floats={"gamma1": 0.7, "gamma2": 0.9, "eps": 1e-8},
        bad={"gamma1": BELOW_ONE, "gamma2": BELOW_ONE, "eps": NEGATIVE},
    ),
    "stabilize": Entry(
        gs.stabilize,
        fixed=lambda: {"optimizer": _sgd(), "clip": gs.clip_by_global_norm(1.0)},
        floats={"limit_updates": 0.2},
        bad={
            "limit_updates": [-1.0, NAN],
            "clip": ["split_magnitude", "clip_update_relative", "no_such_clipper"],
            "optimizer": ["adam"],
        },
    ),
    "zclip": Entry(
        gs.zclip,
        floats={"alpha": 0.9, "z_thresh": 2.0, "max_norm": 10.0, "eps": 1e-6, "clip_factor": 1.0},
        ints={"warmup_steps": 1},
        bad={
            "alpha": [0.0, 1.0, NAN],
            "z_thresh": POSITIVE,
            "max_norm": NEGATIVE,
            "eps": POSITIVE,
            "clip_factor": POSITIVE,
            "warmup_steps": [-1, 1.5],
            "mode": ["median"],
            "clip_option": ["max"],
            "skip_update_on_spike": ["yes", 1],
        },
    ),
}


STEPS = 3
SPIKE_STEP = 1  # a 20x gradient and loss, so that adaptive transforms act within three steps

# Leaves with a leading axis of 8 are sharded over the 8 devices; the scalar is replicated.
SHAPES = {"w": (8, 4), "b": (8,), "s": ()}


# --------------------------------------------------------------------------------------------
# Inputs and runs
# --------------------------------------------------------------------------------------------


def params_tree(dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(0), len(SHAPES))
    return {
        name: (1.0 + jax.random.normal(key, shape, jnp.float32)).astype(dtype)
        for key, (name, shape) in zip(keys, SHAPES.items(), strict=True)
    }


def grads_tree(step: int, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    factor = 20.0 if step == SPIKE_STEP else 1.0 + 0.1 * step
    keys = jax.random.split(jax.random.key(100 + step), len(SHAPES))
    return {
        name: (factor * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
        for key, (name, shape) in zip(keys, SHAPES.items(), strict=True)
    }


def loss(step: int) -> jax.Array:
    return jnp.asarray(20.0 if step == SPIKE_STEP else 1.0 - 0.1 * step, jnp.float32)


# Compiling dominates this file's time; XLA's cheapest backend level compiles several times faster.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def array_floats(entry: Entry) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v, jnp.float32) for k, v in entry.floats.items()}


@functools.cache
def eager_run(name: str) -> tuple[list[Any], list[Any]]:
    """(updates, states) of STEPS eager steps with array hyperparameters (cached: several
    tests compare against it)."""
    entry = MATRIX[name]
    tx = entry.make(**array_floats(entry))
    params = params_tree()
    state = tx.init(params)
    updates_seq, states = [], [state]
    for step in range(STEPS):
        updates, state = tx.update(grads_tree(step), state, params, value=loss(step))
        updates_seq.append(updates)
        states.append(state)
    return updates_seq, states


def assert_close(actual: Any, expected: Any, what: str, rtol: float = 1e-5) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    for path, a, e in zip(
        [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(expected)],
        jax.tree.leaves(actual),
        jax.tree.leaves(expected),
        strict=True,
    ):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}{path}: {a.dtype}{a.shape}"
        if np.issubdtype(a.dtype, np.inexact):
            np.testing.assert_allclose(a, e, rtol=rtol, atol=1e-6, err_msg=f"{what}{path}")
        else:
            np.testing.assert_array_equal(a, e, err_msg=f"{what}{path}")


def assert_same_layout(actual: Any, expected: Any, what: str) -> None:
    """Same tree structure, and every leaf the same shape and dtype."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert (jnp.shape(a), jnp.result_type(a)) == (jnp.shape(e), jnp.result_type(e)), what


NAMES = sorted(MATRIX)

# --------------------------------------------------------------------------------------------
# Coverage
# --------------------------------------------------------------------------------------------


def test_every_public_factory_has_an_entry():
    factories = public_factories()
    assert factories, "no factory found in gradsafe.__all__"
    missing = sorted(factories - set(MATRIX))
    assert not missing, f"add an entry to tests/test_transform_matrix.py MATRIX for: {missing}"
    stale = sorted(set(MATRIX) - factories)
    assert not stale, f"MATRIX names that are not public factories: {stale}"
    callables = {
        name
        for name in gs.__all__
        if callable(getattr(gs, name)) and not inspect.isclass(getattr(gs, name))
    }
    unclassified = sorted(callables - factories - NOT_TRANSFORMS)
    assert not unclassified, (
        f"public callables neither in MATRIX nor NOT_TRANSFORMS: {unclassified}"
    )


@pytest.mark.parametrize("name", NAMES)
def test_entry_names_every_numeric_argument(name):
    """Every argument with a numeric default is in the entry (as a float or an int), and every
    float and int the entry gives is an argument of the factory."""
    entry = MATRIX[name]
    signature = inspect.signature(entry.factory)
    numeric = {
        p.name
        for p in signature.parameters.values()
        if isinstance(p.default, (int, float)) and not isinstance(p.default, bool)
    }
    given = set(entry.floats) | set(entry.ints)
    assert given <= set(signature.parameters), sorted(given - set(signature.parameters))
    assert numeric <= given | set(entry.bad), sorted(numeric - given - set(entry.bad))
    assert set(entry.floats) | set(entry.ints) <= set(entry.bad), "a bad value for each"


# --------------------------------------------------------------------------------------------
# (a) lax.scan with array hyperparameters; jit equals eager
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_scan_keeps_state_layout_and_matches_eager(name):
    entry = MATRIX[name]
    # Shape (1,) hyperparameters: accepted as scalars, they must not change any state shape
    # (the eager reference has shape () ones).
    tx = entry.make(**{k: v.reshape(1) for k, v in array_floats(entry).items()})
    params = params_tree()
    grads = jax.tree.map(lambda *xs: jnp.stack(xs), *[grads_tree(s) for s in range(STEPS)])
    losses = jnp.stack([loss(s) for s in range(STEPS)])

    def step(state, batch):
        updates, state = tx.update(batch[0], state, params, value=batch[1])
        return state, (updates, state)

    @fast_jit
    def train(grads, losses):
        initial = tx.init(params)
        return initial, jax.lax.scan(step, initial, (grads, losses))[1]

    initial, (updates, states) = train(grads, losses)
    eager_updates, eager_states = eager_run(name)
    assert_same_layout(initial, eager_states[0], f"{name}: init under jit vs eager")
    for index in range(STEPS):
        at = functools.partial(jax.tree.map, lambda x, i=index: x[i])
        assert_same_layout(at(states), initial, f"{name}: state after step {index}")
        assert_close(
            at(updates), eager_updates[index], f"{name}: jit vs eager updates, step {index}"
        )
        assert_close(
            at(states), eager_states[index + 1], f"{name}: jit vs eager state, step {index}"
        )


# --------------------------------------------------------------------------------------------
# (b) optax.inject_hyperparams, float32 and bfloat16 params, under jit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_under_jit(name):
    entry = MATRIX[name]
    static = tuple(entry.fixed()) + tuple(entry.ints)
    injected = optax.inject_hyperparams(entry.factory, static_args=static)(**entry.kwargs())

    @fast_jit
    def run(params_32, params_16):
        results = []
        for params in (params_32, params_16):
            dtype = jax.tree.leaves(params)[0].dtype
            state = injected.init(params)
            results.append(injected.update(grads_tree(0, dtype), state, params, value=loss(0)))
        return results

    (updates_32, state_32), (updates_16, _) = run(
        params_tree(jnp.float32), params_tree(jnp.bfloat16)
    )
    assert set(entry.floats) <= set(state_32.hyperparams), sorted(state_32.hyperparams)
    for updates, dtype in ((updates_32, jnp.float32), (updates_16, jnp.bfloat16)):
        for leaf in jax.tree.leaves(updates):
            assert leaf.dtype == dtype, (name, leaf.dtype, dtype)
            assert bool(jnp.all(jnp.isfinite(leaf))), (name, dtype)
    # Injected numbers are the same numbers.
    assert_close(updates_32, eager_run(name)[0][0], f"{name}: injected vs plain")


# --------------------------------------------------------------------------------------------
# (c) explicit-sharding mesh
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))


def shard(tree: Any, mesh: Any) -> Any:
    def put(x):
        spec = jax.sharding.PartitionSpec("x") if x.ndim else jax.sharding.PartitionSpec()
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    return jax.tree.map(put, tree)


@pytest.mark.parametrize("name", NAMES)
def test_explicit_sharding_matches_unsharded(name, mesh):
    entry = MATRIX[name]
    tx = entry.make(**array_floats(entry))
    with jax.set_mesh(mesh):
        params = shard(params_tree(), mesh)
        step = fast_jit(lambda g, p: tx.update(g, tx.init(p), p, value=loss(0))[0])
        updates = step(shard(grads_tree(0), mesh), params)
    for leaf, reference in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert leaf.sharding.is_equivalent_to(reference.sharding, leaf.ndim), (name, leaf.sharding)
    assert_close(jax.device_get(updates), eager_run(name)[0][0], f"{name}: sharded vs unsharded")


# --------------------------------------------------------------------------------------------
# (d) empty tree, bad arguments, grad at zero
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_empty_tree(name):
    tx = MATRIX[name].make()
    state = tx.init({})
    updates, new_state = tx.update({}, state, {}, value=loss(0))
    assert updates == {}
    assert_same_layout(new_state, state, f"{name}: empty-tree state")
    updates, _ = jax.jit(tx.update)({}, state, {}, value=loss(0))
    assert updates == {}


def bad_cases(name: str) -> list[tuple[str, Any]]:
    """The entry's own bad values, and for every argument of a kind the ones every such
    argument rejects: non-scalar arrays (shape (2,)) and strings for floats, bools
    and fractional numbers for integers, and invalid mesh axis names."""
    entry = MATRIX[name]
    cases = [(arg, value) for arg, values in entry.bad.items() for value in values]
    for arg in entry.floats:
        cases += [(arg, np.ones(2, np.float32)), (arg, "1.0")]
    for arg in entry.ints:
        cases += [(arg, True), (arg, 2.0)]
    if "axis_name" in inspect.signature(entry.factory).parameters:
        cases += [("axis_name", 3), ("axis_name", "")]
    return cases


BAD_CASES = [(name, arg, value) for name in NAMES for arg, value in bad_cases(name)]


def _case_id(name: str, arg: str, value: Any) -> str:
    """A test id that is the same in every process (no memory addresses), for pytest-xdist."""
    text = re.sub(r" at 0x[0-9a-f]+", "", repr(value))
    return f"{name}-{arg}={text}"


@pytest.mark.parametrize(
    ("name", "arg", "value"), BAD_CASES, ids=[_case_id(n, a, v) for n, a, v in BAD_CASES]
)
def test_bad_argument_raises_value_error_naming_it(name, arg, value):
    entry = MATRIX[name]
    kwargs = entry.kwargs()
    kwargs[arg] = value
    with pytest.raises(ValueError, match=arg):
        entry.factory(**kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_grad_through_update_is_finite_at_zero_gradients(name):
    entry = MATRIX[name]
    tx = entry.make()
    params = params_tree()
    state = tx.init(params)

    def total(grads):
        updates, _ = tx.update(grads, state, params, value=loss(0))
        return sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(updates))

    zeros = jax.tree.map(jnp.zeros_like, params)
    derivative = fast_jit(jax.grad(total))(zeros)
    for leaf in jax.tree.leaves(derivative):
        assert bool(jnp.all(jnp.isfinite(leaf))), name


def _shared_buffers(state: Any) -> list[str]:
    """Paths of state leaves that hold the same device buffer as an earlier leaf."""
    seen: dict[int, str] = {}
    shared = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            pointer = leaf.unsafe_buffer_pointer()
            if pointer in seen:
                shared.append(f"{jax.tree_util.keystr(path)} (as {seen[pointer]})")
            seen.setdefault(pointer, jax.tree_util.keystr(path))
    return shared


@pytest.mark.parametrize("name", NAMES)
def test_state_can_be_donated(name):
    """A train step donates the optimizer state (Flax, Optax examples): no two leaves of a
    state may share one buffer, after ``init`` or after an eager ``update`` (XLA refuses to
    donate a buffer twice)."""
    tx = MATRIX[name].make()
    params = params_tree()
    state = tx.init(params)
    assert not _shared_buffers(state), f"{name}: init shares {_shared_buffers(state)}"
    grads = jax.tree.map(jnp.ones_like, params)
    _, eager = tx.update(grads, state, params, value=loss(0))
    assert not _shared_buffers(eager), f"{name}: update shares {_shared_buffers(eager)}"
    step = jax.jit(lambda s: tx.update(grads, s, params, value=loss(0))[1], donate_argnums=0)
    jax.block_until_ready(step(step(state)))


def test_a_chain_of_every_factory_shares_no_buffer():
    """Module-level constants must not end up in two states of one chain either (a shared
    buffer anywhere in the donated state makes XLA refuse the step)."""
    state = optax.chain(*(MATRIX[name].make() for name in NAMES)).init(params_tree())
    assert not _shared_buffers(state), _shared_buffers(state)
