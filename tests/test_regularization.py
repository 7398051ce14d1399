"""Regularization: gradient terms, proximal steps (jaxopt's numbers), Clippy, masks, edges."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization
from hypothesis import given
from hypothesis import strategies as st

import gradsafe as gs

# ------------------------------------------------------------------------------------------
# helpers and reference formulas
# ------------------------------------------------------------------------------------------


def run(tx, updates, params, jit=True):
    """One update of a fresh transform; returns (updates, state)."""
    update = jax.jit(tx.update) if jit else tx.update
    return update(updates, tx.init(params), params)


def landed(params, updates):
    """Where ``optax.apply_updates`` takes the parameters, in float64 for comparisons."""
    return jax.tree.map(
        lambda p, u: np.asarray(p, np.float64) + np.asarray(u, np.float64), params, updates
    )


# jaxopt's proximal operators, written from their formulas (jaxopt/_src/prox.py), in float64.
def ref_prox_lasso(x, l1reg, scaling):
    return np.sign(x) * np.maximum(np.abs(x) - l1reg * scaling, 0.0)


def ref_prox_elastic_net(x, l1reg, gamma, scaling):
    return ref_prox_lasso(x, l1reg, scaling) / (1.0 + scaling * l1reg * gamma)


def ref_prox_group_lasso(x, l2reg, scaling):
    norm = np.sqrt(np.sum(np.square(x)))
    factor = 1.0 - l2reg * scaling / norm if norm > 0 else 0.0
    return max(factor, 0.0) * x


ALL = {
    "add_l2": lambda: gs.add_l2(0.1),
    "add_l1": lambda: gs.add_l1(0.1),
    "add_elastic_net": lambda: gs.add_elastic_net(0.1, 0.2),
    "prox_l1": lambda: gs.prox_l1(0.5, 0.1),
    "prox_elastic_net": lambda: gs.prox_elastic_net(0.5, 0.3, 0.1),
    "prox_elastic_net_abs": lambda: gs.prox_elastic_net(0.5, 0.3, 0.1, l2_relative=False),
    "prox_group_lasso": lambda: gs.prox_group_lasso(0.5, 0.1),
    "clip_update_relative": lambda: gs.clip_update_relative(),
}
PROX = ["prox_l1", "prox_elastic_net", "prox_elastic_net_abs", "prox_group_lasso"]

# Fixed shapes, and hyperparameters passed as jit arguments (checked only at run time), so
# that each property compiles once instead of once per example.
finite_arrays = hnp.arrays(np.float32, (2, 3), elements=st.floats(-100, 100, width=32))


def one_step(name, updates, params, *hyperparams):
    """One update of ``name``'s transform, built from (possibly traced) hyperparameters."""
    tx = getattr(gs, name)(*hyperparams)
    return tx.update(updates, tx.init(params), params)


jitted_step = jax.jit(one_step, static_argnums=0)


@jax.jit
def group_lasso_gradient(updates, l2reg):
    """``jax.grad`` of the summed group-lasso update with respect to the updates, params 0."""
    zeros = jnp.zeros_like(updates)
    return jax.grad(lambda u: jnp.sum(one_step("prox_group_lasso", u, zeros, l2reg, 1.0)[0]))(
        updates
    )


def random_tree(seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    return {
        "dense": {
            "kernel": jax.random.normal(keys[0], (4, 3)),
            "bias": jax.random.normal(keys[1], (3,)),
        },
        "scale": jax.random.normal(keys[2], (5,)),
    }


# ------------------------------------------------------------------------------------------
# gradient terms: expected numbers
# ------------------------------------------------------------------------------------------


def test_add_l2_equals_grad_of_penalty_and_optax():
    params, grads = random_tree(0), random_tree(1)
    weight = 0.3
    updates, state = run(gs.add_l2(weight), grads, params)
    penalty = lambda w: weight / 2 * optax.tree.norm(w, squared=True)
    expected = jax.tree.map(jnp.add, grads, jax.grad(penalty)(params))
    chex_close(updates, expected, 1e-6)
    np.testing.assert_allclose(state.penalty, penalty(params), rtol=1e-6)
    optax_updates, _ = run(optax.add_decayed_weights(weight), grads, params)
    chex_close(updates, optax_updates, 0)


def test_add_l2_pure_penalty_gradient():
    params = {"w": jnp.array([2.0, -4.0, 0.0])}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = run(gs.add_l2(0.5), zeros, params)
    np.testing.assert_array_equal(updates["w"], [1.0, -2.0, 0.0])
    assert float(state.penalty) == 5.0  # 0.25 * (4 + 16)


def test_add_l1_expected_numbers():
    params = {"w": jnp.array([2.0, 0.0, -4.0, 1e-30])}
    grads = {"w": jnp.array([1.0, 1.0, 1.0, 0.0])}
    updates, state = run(gs.add_l1(0.25), grads, params)
    np.testing.assert_array_equal(updates["w"], [1.25, 1.0, 0.75, 0.25])  # sign(0) = 0
    np.testing.assert_allclose(state.penalty, 0.25 * 6.0, rtol=1e-7)


def test_add_l1_equals_grad_of_penalty_away_from_zero():
    params, grads = random_tree(2), random_tree(3)
    penalty = lambda w: 0.2 * optax.tree.norm(w, ord=1)
    updates, _ = run(gs.add_l1(0.2), grads, params)
    chex_close(updates, jax.tree.map(jnp.add, grads, jax.grad(penalty)(params)), 1e-6)


def test_add_elastic_net_is_l1_plus_l2():
    params, grads = random_tree(4), random_tree(5)
    net, _ = run(gs.add_elastic_net(0.2, 0.7), grads, params)
    both, _ = run(optax.chain(gs.add_l1(0.2), gs.add_l2(0.7)), grads, params)
    chex_close(net, both, 1e-6)
    penalty = lambda w: 0.2 * optax.tree.norm(w, ord=1) + 0.35 * optax.tree.norm(w, squared=True)
    expected = jax.tree.map(jnp.add, grads, jax.grad(penalty)(params))
    chex_close(net, expected, 1e-6)
    _, state = run(gs.add_elastic_net(0.2, 0.7), grads, params)
    np.testing.assert_allclose(state.penalty, penalty(params), rtol=1e-6)


def chex_close(actual, expected, rtol):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=rtol)


# ------------------------------------------------------------------------------------------
# proximal steps: expected numbers and jaxopt parity
# ------------------------------------------------------------------------------------------


def test_prox_l1_expected_numbers():
    params = jnp.array([0.5, -0.25, -1.5, 0.25, 0.0])
    updates = jnp.array([-0.2, 0.2, 0.5, -0.15, 0.0])  # x = [0.3, -0.05, -1.0, 0.1, 0.0]
    new_updates, state = run(gs.prox_l1(0.5, 0.2), updates, params)  # t = 0.1
    np.testing.assert_allclose(landed(params, new_updates), [0.2, 0.0, -0.9, 0.0, 0.0], atol=1e-7)
    new_params = optax.apply_updates(params, new_updates)
    # exact zeros, also where the threshold 0.1 is met exactly
    np.testing.assert_array_equal(new_params[jnp.array([1, 3, 4])], 0.0)
    np.testing.assert_allclose(state.threshold, 0.1)
    np.testing.assert_allclose(state.zero_fraction, 3 / 5)


def test_prox_elastic_net_expected_numbers():
    params = jnp.array([0.3, -1.0, 0.05])
    zeros = jnp.zeros(3)
    # jaxopt: soft(x, 0.2 * 0.5) / (1 + 0.2 * 0.5 * 2)
    relative, _ = run(gs.prox_elastic_net(0.5, 2.0, 0.2), zeros, params)
    np.testing.assert_allclose(landed(params, relative), [0.2 / 1.2, -0.9 / 1.2, 0.0], rtol=1e-6)
    # absolute L2 strength: soft(x, 0.1) / (1 + 0.2 * 2)
    absolute, _ = run(gs.prox_elastic_net(0.5, 2.0, 0.2, l2_relative=False), zeros, params)
    np.testing.assert_allclose(landed(params, absolute), [0.2 / 1.4, -0.9 / 1.4, 0.0], rtol=1e-6)
    assert float(optax.apply_updates(params, relative)[2]) == 0.0


def test_prox_group_lasso_expected_numbers_per_leaf():
    params = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.6, 0.8]), "c": jnp.zeros(2)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = run(gs.prox_group_lasso(2.0, 0.5), zeros, params)  # t = 1
    out = landed(params, updates)
    np.testing.assert_allclose(out["a"], [2.4, 3.2], rtol=1e-6)
    np.testing.assert_array_equal(optax.apply_updates(params, updates)["b"], [0.0, 0.0])
    np.testing.assert_array_equal(optax.apply_updates(params, updates)["c"], [0.0, 0.0])
    np.testing.assert_allclose(state.zero_fraction, 4 / 6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prox_parity_with_jaxopt_formulas(seed):
    params, updates = random_tree(seed), jax.tree.map(lambda x: 0.3 * x, random_tree(seed + 10))
    x = landed(params, updates)
    l1reg, l2reg, lr = 0.7, 1.3, 0.4
    cases = [
        (gs.prox_l1(l1reg, lr), lambda v: ref_prox_lasso(v, l1reg, lr)),
        (
            gs.prox_elastic_net(l1reg, l2reg, lr),
            lambda v: ref_prox_elastic_net(v, l1reg, l2reg, lr),
        ),
        (gs.prox_group_lasso(l2reg, lr), lambda v: ref_prox_group_lasso(v, l2reg, lr)),
    ]
    for tx, reference in cases:
        new_updates, _ = run(tx, updates, params)
        got = landed(params, new_updates)
        for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(x), strict=True):
            np.testing.assert_allclose(g, reference(v), rtol=2e-6, atol=2e-6)


def test_group_lasso_one_leaf_equals_jaxopt_whole_tree():
    x = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
    updates, _ = run(gs.prox_group_lasso(0.8, 1.5), jnp.zeros((2, 2)), jnp.asarray(x))
    np.testing.assert_allclose(landed(x, updates), ref_prox_group_lasso(x, 0.8, 1.5), rtol=1e-6)


def test_prox_with_zero_strength_is_identity():
    params, updates = random_tree(7), random_tree(8)
    for tx in (
        gs.prox_l1(0.0, 0.1),
        gs.prox_elastic_net(0.0, 5.0, 0.1),
        gs.prox_group_lasso(1.0, 0.0),
    ):
        new_updates, _ = run(tx, updates, params)
        chex_close(new_updates, updates, 0)


def test_lasso_regression_recovers_sparse_support():
    rng = np.random.default_rng(0)
    n, d = 80, 20
    features = rng.normal(size=(n, d)).astype(np.float32)
    true_w = np.zeros(d, np.float32)
    support = np.array([2, 7, 15])
    true_w[support] = [2.0, -1.5, 1.0]
    targets = features @ true_w + 0.01 * rng.normal(size=n).astype(np.float32)
    features, targets = jnp.asarray(features), jnp.asarray(targets)

    def loss(w):
        return 0.5 * jnp.mean(jnp.square(features @ w - targets))

    lr = 0.2
    tx = optax.chain(optax.sgd(lr), gs.prox_l1(0.05, lr))

    def step(carry, _):
        w, state = carry
        updates, state = tx.update(jax.grad(loss)(w), state, w)
        return (optax.apply_updates(w, updates), state), None

    w0 = jnp.zeros(d)
    (w, state), _ = jax.lax.scan(step, (w0, tx.init(w0)), None, length=300)
    w = np.asarray(w)
    np.testing.assert_array_equal(np.flatnonzero(w), support)  # exact zeros elsewhere
    np.testing.assert_allclose(w[support], true_w[support], atol=0.1)
    np.testing.assert_allclose(gs.metrics(state)["prox_l1/zero_fraction"], 17 / 20)


# ------------------------------------------------------------------------------------------
# clip_update_relative (Clippy)
# ------------------------------------------------------------------------------------------


def test_clippy_expected_numbers():
    params = {"a": jnp.array([1.0, 10.0, 0.0]), "b": jnp.array([1.0])}
    updates = {"a": jnp.array([0.5, 0.5, 0.0]), "b": jnp.array([0.05])}
    new, state = run(gs.clip_update_relative(0.1, 0.0), updates, params)
    np.testing.assert_allclose(new["a"], [0.1, 0.1, 0.0], rtol=1e-6)  # s = 0.1 / 0.5
    np.testing.assert_array_equal(new["b"], updates["b"])  # within bound: untouched
    np.testing.assert_allclose(state.scale, 0.2, rtol=1e-6)
    assert bool(state.clipped)


def test_clippy_absolute_bound_and_exact_bound():
    params = jnp.array([0.0, 2.0])
    new, state = run(gs.clip_update_relative(0.5, 0.25), jnp.array([1.0, 0.0]), params)
    np.testing.assert_allclose(new, [0.25, 0.0])  # zero param: bound is `absolute`
    exact, state = run(gs.clip_update_relative(0.5, 0.25), jnp.array([0.25, -1.25]), params)
    np.testing.assert_array_equal(exact, [0.25, -1.25])  # bound met exactly: unchanged
    assert float(state.scale) == 1.0 and not bool(state.clipped)


def test_clippy_zero_update_zero_bound_gives_zeros():
    new, state = run(gs.clip_update_relative(0.0, 0.0), jnp.zeros(3), jnp.zeros(3))
    np.testing.assert_array_equal(new, np.zeros(3))
    assert float(state.scale) == 1.0


@given(finite_arrays, st.floats(0.0, 2.0), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_clippy_property_bound_holds_and_direction_kept(params, relative, absolute, seed):
    updates = np.random.default_rng(seed).normal(scale=5.0, size=params.shape).astype(np.float32)
    new, state = jitted_step("clip_update_relative", updates, params, relative, absolute)
    new = np.asarray(new, np.float64)
    scale = float(state.scale)
    assert 0.0 <= scale <= 1.0
    bound = np.float32(relative) * np.abs(params) + np.float32(absolute)
    assert np.all(np.abs(new) <= bound * (1 + 1e-5) + 1e-30)
    np.testing.assert_allclose(new, scale * updates.astype(np.float64), rtol=1e-6, atol=1e-30)


# ------------------------------------------------------------------------------------------
# schedules and hyperparameters
# ------------------------------------------------------------------------------------------


def test_learning_rate_and_weight_schedules():
    params = jnp.array([1.0, -1.0])
    zeros = jnp.zeros(2)
    lr = optax.linear_schedule(0.4, 0.0, 4)  # 0.4, 0.3, 0.2, ...
    l1reg = lambda step: 0.5 * (step + 1).astype(jnp.float32)  # 0.5, 1.0, 1.5
    tx = gs.prox_l1(l1reg, lr)
    state = tx.init(params)
    for expected in (0.2, 0.3, 0.3):
        updates, state = tx.update(zeros, state, params)
        np.testing.assert_allclose(state.threshold, expected, rtol=1e-6)
        np.testing.assert_allclose(landed(params, updates), [1 - expected, expected - 1], 1e-6)

    tx = gs.add_l2(optax.linear_schedule(1.0, 0.0, 2))
    state = tx.init(params)
    for expected in (1.0, 0.5, 0.0):
        updates, state = tx.update(zeros, state, params)
        np.testing.assert_allclose(updates, expected * np.asarray(params))


def test_schedules_for_every_transform():
    halving = lambda step: 0.2 / (1.0 + step.astype(jnp.float32))
    cases = [
        gs.add_l1(halving),
        gs.add_elastic_net(halving, halving),
        gs.prox_elastic_net(halving, 1.0, halving),
        gs.prox_group_lasso(1.0, halving),
        gs.clip_update_relative(halving, halving),
    ]
    params, updates = random_tree(11), random_tree(12)
    for tx in cases:
        state = tx.init(params)
        first, state = jax.jit(tx.update)(updates, state, params)
        second, state = jax.jit(tx.update)(updates, state, params)
        assert not np.allclose(np.asarray(first["scale"]), np.asarray(second["scale"]))


def test_inject_hyperparams_with_mask_in_static_args():
    params, updates = random_tree(13), random_tree(14)
    mask = gs.path_mask(exclude=r"bias$")
    plain = gs.prox_l1(0.5, 0.1, mask=mask)
    injected = optax.inject_hyperparams(gs.prox_l1, static_args=("mask",))(
        l1reg=0.5, learning_rate=0.1, mask=mask
    )
    expected, _ = run(plain, updates, params)
    got, state = run(injected, updates, params)
    chex_close(got, expected, 0)
    chex_close(got["dense"]["bias"], updates["dense"]["bias"], 0)
    assert "prox_l1/threshold" in gs.metrics(state)


def test_inject_hyperparams_without_static_mask_raises():
    tx = optax.inject_hyperparams(gs.add_l2)(0.1, mask=gs.path_mask(exclude="bias"))
    with pytest.raises(ValueError, match="static_args"):
        tx.init(random_tree(0))


# ------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL))
def test_masked_leaves_pass_through(name):
    params, updates = random_tree(20), random_tree(21)
    mask = gs.path_mask(exclude=[r"bias$", r"^scale$"])
    plain = ALL[name]()
    factory = {
        "add_l2": lambda m: gs.add_l2(0.1, mask=m),
        "add_l1": lambda m: gs.add_l1(0.1, mask=m),
        "add_elastic_net": lambda m: gs.add_elastic_net(0.1, 0.2, mask=m),
        "prox_l1": lambda m: gs.prox_l1(0.5, 0.1, mask=m),
        "prox_elastic_net": lambda m: gs.prox_elastic_net(0.5, 0.3, 0.1, mask=m),
        "prox_elastic_net_abs": lambda m: gs.prox_elastic_net(
            0.5, 0.3, 0.1, mask=m, l2_relative=False
        ),
        "prox_group_lasso": lambda m: gs.prox_group_lasso(0.5, 0.1, mask=m),
        "clip_update_relative": lambda m: gs.clip_update_relative(mask=m),
    }[name]
    for m in (mask, mask(params)):  # a function or a tree of bools
        masked, _ = run(factory(m), updates, params)
        full, _ = run(plain, updates, params)
        chex_close(masked["dense"]["bias"], updates["dense"]["bias"], 0)
        chex_close(masked["scale"], updates["scale"], 0)
        chex_close(masked["dense"]["kernel"], full["dense"]["kernel"], 1e-6)


def test_penalty_counts_only_unmasked_leaves():
    params = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([10.0])}
    tx = gs.add_l1(1.0, mask=gs.path_mask(include="w"))
    _, state = run(tx, jax.tree.map(jnp.zeros_like, params), params)
    np.testing.assert_allclose(gs.metrics(state)["add_l1/penalty"], 3.0)


# ------------------------------------------------------------------------------------------
# jit, checkpoints, metrics, missing params, bad arguments
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL))
def test_checkpoint_round_trip(name):
    params, updates = random_tree(32), random_tree(33)
    tx = optax.chain(ALL[name](), optax.sgd(0.1))
    state = tx.init(params)
    _, state = tx.update(updates, state, params)
    restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    chex_close(tx.update(updates, restored, params), tx.update(updates, state, params), 0)


def test_metrics_names():
    params, updates = random_tree(34), random_tree(35)
    tx = optax.chain(
        gs.add_l2(0.1), optax.sgd(0.1), gs.clip_update_relative(), gs.prox_group_lasso(0.1, 0.1)
    )
    _, state = run(tx, updates, params)
    found = gs.metrics(state)
    for key in (
        "add_l2/penalty",
        "add_l2/count",
        "clip_update_relative/scale",
        "clip_update_relative/clipped",
        "prox_group_lasso/threshold",
        "prox_group_lasso/zero_fraction",
    ):
        assert key in found
    assert int(found["add_l2/count"]) == 1


@pytest.mark.parametrize("name", list(ALL))
def test_missing_params_raise(name):
    tx = ALL[name]()
    grads = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="requires the current value of parameters"):
        tx.update(grads, tx.init(grads), None)


BAD_ARGUMENTS = [
    (lambda: gs.add_l2(-0.1), "weight"),
    (lambda: gs.add_l2(float("nan")), "weight"),
    (lambda: gs.add_l1("big"), "weight"),
    (lambda: gs.add_elastic_net(-1.0, 0.1), "l1"),
    (lambda: gs.add_elastic_net(0.1, float("inf")), "l2"),
    (lambda: gs.prox_l1(-0.5, 0.1), "l1reg"),
    (lambda: gs.prox_l1(0.5, -0.1), "learning_rate"),
    (lambda: gs.prox_l1(0.5, [0.1, 0.2]), "learning_rate"),
    (lambda: gs.prox_elastic_net(0.5, -1.0, 0.1), "l2reg"),
    (lambda: gs.prox_elastic_net(0.5, 1.0, 0.1, l2_relative="yes"), "l2_relative"),
    (lambda: gs.prox_group_lasso(-1.0, 0.1), "l2reg"),
    (lambda: gs.prox_group_lasso(1.0, True), "learning_rate"),
    (lambda: gs.clip_update_relative(-0.1), "relative"),
    (lambda: gs.clip_update_relative(0.1, -1e-7), "absolute"),
    (lambda: gs.clip_update_relative(axis_name=5), "axis_name"),
    (lambda: gs.add_l2(0.1, mask="bias"), "mask"),
    (lambda: gs.prox_l1(0.1, 0.1, mask=True), "mask"),
    (lambda: gs.clip_update_relative(mask=jnp.array(True)), "mask"),
]


@pytest.mark.parametrize(("call", "argument"), BAD_ARGUMENTS)
def test_bad_arguments_name_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


# ------------------------------------------------------------------------------------------
# edge matrix: NaN, Inf, zero, fp16, bf16, int, None, empty tree
# ------------------------------------------------------------------------------------------


def edge_tree():
    return {
        "nan": jnp.array([jnp.nan, 1.0, 0.0]),
        "inf": jnp.array([jnp.inf, -1.0, 0.0]),
        "zero": jnp.zeros(3),
        "f16": jnp.array([1.0, -2.0, 0.0], jnp.float16),
        "bf16": jnp.array([1.0, -2.0, 0.0], jnp.bfloat16),
        "int": jnp.array([1, 2, 3], jnp.int32),
        "none": None,
    }


@pytest.mark.parametrize("name", list(ALL))
def test_edge_matrix(name):
    updates = edge_tree()
    params = {**edge_tree(), "nan": jnp.array([0.5, 2.0, 0.0]), "inf": jnp.array([0.5, 2.0, 0.0])}
    new, state = run(ALL[name](), updates, params)
    assert new["none"] is None
    np.testing.assert_array_equal(new["int"], updates["int"])
    assert new["int"].dtype == jnp.int32
    for key in ("nan", "inf", "zero", "f16", "bf16"):
        assert new[key].dtype == updates[key].dtype, key
    # a NaN entry stays NaN (a guard must see it), finite neighbours stay finite
    assert np.isnan(np.asarray(new["nan"][0]))
    assert np.all(np.isfinite(np.asarray(new["zero"])))
    assert np.all(np.isfinite(np.asarray(new["f16"], np.float32)))
    assert np.all(np.isfinite(np.asarray(new["bf16"], np.float32)))
    # non-finite entries stay non-finite and do not spread to their neighbours
    assert np.all(np.isfinite(np.asarray(new["nan"][1:])))
    assert not np.isfinite(np.asarray(new["inf"][0]))
    assert np.all(np.isfinite(np.asarray(new["inf"][1:])))
    for value in jax.tree.leaves(state):
        assert np.shape(value) == ()


@pytest.mark.parametrize("name", PROX)
def test_low_precision_exact_zeros(name):
    for dtype in (jnp.float16, jnp.bfloat16):
        params = jnp.array([0.01, -0.02, 3.0], dtype)
        updates, _ = run(ALL[name](), jnp.zeros(3, dtype), params)
        assert updates.dtype == dtype
        new = optax.apply_updates(params, updates)
        if name == "prox_group_lasso":
            assert float(new[2]) != 0.0
        else:
            np.testing.assert_array_equal(np.asarray(new[:2], np.float32), [0.0, 0.0])


def test_group_lasso_nonfinite_leaf_passes_through():
    params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0, 4.0])}
    updates = {"a": jnp.array([jnp.nan, 0.0]), "b": jnp.array([0.0, 0.0])}
    new, _ = run(gs.prox_group_lasso(1.0, 1.0), updates, params)
    assert np.isnan(np.asarray(new["a"][0])) and float(new["a"][1]) == 0.0  # not zeroed
    np.testing.assert_allclose(landed(params, new)["b"], [2.4, 3.2], rtol=1e-6)


def test_float64_under_x64():
    with jax.enable_x64(True):
        params = jnp.array([0.3, -1e-12], jnp.float64)
        updates, _ = run(gs.prox_l1(1e-3, 1.0), jnp.zeros(2, jnp.float64), params)
        assert updates.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(params + updates), [0.299, 0.0], rtol=1e-12)


def test_complex_leaves_shrink_modulus():
    params = jnp.array([3.0 + 4.0j, 0.1 + 0.0j], jnp.complex64)
    updates, _ = run(gs.prox_l1(1.0, 1.0), jnp.zeros(2, jnp.complex64), params)
    new = np.asarray(params + updates)
    np.testing.assert_allclose(new, [2.4 + 3.2j, 0.0], rtol=1e-6)
    assert updates.dtype == jnp.complex64


def test_state_is_stable_under_scan():
    params, updates = random_tree(40), random_tree(41)
    for name in ALL:
        tx = ALL[name]()

        def step(state, _, tx=tx):
            return tx.update(updates, state, params)[1], None

        state = tx.init(params)
        final, _ = jax.lax.scan(step, state, None, length=3)
        assert jax.tree.structure(final) == jax.tree.structure(state)
        for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(state), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape


# ------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------


def l1_objective(y, x, t):
    return 0.5 * np.square(y - x) + t * np.abs(y)


@given(finite_arrays, st.floats(0.0, 10.0), st.floats(0.0, 2.0))
def test_prox_l1_output_is_the_minimiser(x, l1reg, lr):
    new, _ = jitted_step("prox_l1", jnp.asarray(x), jnp.zeros_like(x), l1reg, lr)
    y = np.asarray(new, np.float64)
    t = float(np.float32(l1reg) * np.float32(lr))
    x64 = x.astype(np.float64)
    # brute force: a grid around each entry, plus zero, never does better
    grid = x64[..., None] + np.linspace(-12.0, 12.0, 2401)
    grid = np.concatenate([grid, np.zeros((*x.shape, 1))], axis=-1)
    best = np.min(l1_objective(grid, x64[..., None], t), axis=-1)
    achieved = l1_objective(y, x64, t)
    assert np.all(achieved <= best + 1e-4 * (1 + np.abs(x64)))
    np.testing.assert_allclose(y, ref_prox_lasso(x64, l1reg, lr), rtol=1e-5, atol=1e-5)


@given(finite_arrays, finite_arrays, st.floats(0.0, 5.0), st.floats(0.0, 5.0))
def test_shrinkage_never_increases_magnitude(params, updates, reg, lr):
    x = np.abs(params.astype(np.float64) + updates.astype(np.float64))
    for name, hyperparams in (
        ("prox_l1", (reg, lr)),
        ("prox_elastic_net", (reg, 1.0, lr)),
        ("prox_group_lasso", (reg, lr)),
    ):
        new, _ = jitted_step(name, jnp.asarray(updates), jnp.asarray(params), *hyperparams)
        y = np.abs(landed(params, new))
        assert np.all(y <= x * (1 + 1e-6) + 1e-4)


@given(finite_arrays, st.floats(0.0, 5.0), st.floats(0.0, 2.0))
def test_group_lasso_minimises_its_objective(x, l2reg, lr):
    new, _ = jitted_step("prox_group_lasso", jnp.asarray(x), jnp.zeros_like(x), l2reg, lr)
    y = np.asarray(new, np.float64)
    t = float(np.float32(l2reg) * np.float32(lr))
    x64 = x.astype(np.float64)

    def objective(v):
        return 0.5 * np.sum(np.square(v - x64)) + t * np.sqrt(np.sum(np.square(v)))

    rng = np.random.default_rng(0)
    candidates = [np.zeros_like(x64), x64] + [
        y + rng.normal(scale=0.01, size=y.shape) for _ in range(20)
    ]
    candidates += [s * x64 for s in np.linspace(0.0, 1.0, 21)]
    assert objective(y) <= min(objective(c) for c in candidates) + 1e-4 * (1 + np.abs(x64).sum())


@given(finite_arrays, st.floats(0.0, 5.0))
def test_group_lasso_gradient_finite_at_zero_and_anywhere(x, l2reg):
    for point in (jnp.zeros_like(jnp.asarray(x)), jnp.asarray(x)):
        assert np.all(np.isfinite(np.asarray(group_lasso_gradient(point, l2reg))))
