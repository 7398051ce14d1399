"""stabilize(): the order of the stack, clip by name (from the table of clippers) or transform,
options, inject_hyperparams, the missing-params message."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import gradsafe as gs


def bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def guards_outside_in(state):
    """Names of the gradsafe states from the outermost inward (metrics keeps tree order)."""
    names = []
    for key in gs.metrics(state):
        name = key.split("/")[0]
        if name not in names:
            names.append(name)
    return names


PARAMS = {"w": jnp.array([[0.5, -1.0], [2.0, 0.25]]), "b": jnp.array([0.1, -0.2])}


def grads(scale=1.0, bad=None):
    g = jax.tree.map(lambda x: jnp.cos(x) * scale, PARAMS)
    if bad is not None:
        g["b"] = g["b"].at[0].set(bad)
    return g


@pytest.mark.parametrize(
    "options, order",
    [
        ({}, ["skip_nonfinite", "clip_by_global_norm", "clip_update_relative"]),
        ({"limit_updates": False}, ["skip_nonfinite", "clip_by_global_norm"]),
        ({"skip_nonfinite": False}, ["clip_by_global_norm", "clip_update_relative"]),
        ({"skip_spikes": True}, ["skip_on_spike", "clip_by_global_norm", "clip_update_relative"]),
        (
            {"loss_scale": True, "limit_updates": False},
            ["dynamic_loss_scale", "clip_by_global_norm"],
        ),
        (
            {"skip_spikes": {"window": 8, "min_history": 4}, "loss_scale": 1024.0},
            ["dynamic_loss_scale", "skip_on_spike", "clip_by_global_norm", "clip_update_relative"],
        ),
    ],
)
def test_order_of_the_stack(options, order):
    tx = gs.stabilize(optax.sgd(0.1), clip="clip_by_global_norm", **options)
    assert guards_outside_in(tx.init(PARAMS)) == order


def test_equals_the_hand_built_stack():
    ours = gs.stabilize(
        optax.adamw(1e-2),
        clip=gs.clip_by_global_norm(0.5),
        skip_spikes={"window": 8, "min_history": 4},
        loss_scale={"init_scale": 8.0, "growth_interval": 3},
    )
    limit = gs.clip_update_relative(relative=0.1, absolute=0.01)
    hand = gs.dynamic_loss_scale(
        gs.skip_on_spike(
            optax.chain(gs.clip_by_global_norm(0.5), optax.adamw(1e-2), limit),
            window=8,
            min_history=4,
        ),
        init_scale=8.0,
        growth_interval=3,
    )
    s_ours, s_hand = ours.init(PARAMS), hand.init(PARAMS)
    update_ours, update_hand = jax.jit(ours.update), jax.jit(hand.update)
    with jax.numpy_dtype_promotion("standard"):  # optax.adamw mixes float and int32
        for i, bad in enumerate([None, None, jnp.nan, None, jnp.inf, None, None]):
            g, loss = grads(8.0 * (i + 1), bad), jnp.array(1.0 + i)
            u_ours, s_ours = update_ours(g, s_ours, PARAMS, value=loss)
            u_hand, s_hand = update_hand(g, s_hand, PARAMS, value=loss)
            assert bits(u_ours) == bits(u_hand)
            assert bits(s_ours) == bits(s_hand)


def test_refuses_nonfinite_steps_and_clips():
    tx = gs.stabilize(optax.sgd(1.0), clip="clip_by_global_norm", limit_updates=False)
    state = tx.init(PARAMS)
    updates, state = tx.update(grads(100.0), state)
    assert float(gs.global_norm(updates)) == pytest.approx(1.0, rel=1e-6)
    updates, state = tx.update(grads(1.0, jnp.nan), state)
    assert all((np.asarray(u) == 0).all() for u in jax.tree.leaves(updates))
    assert int(gs.metrics(state)["skip_nonfinite/total_skips"]) == 1


def test_clip_none_and_a_transform():
    g = grads(3.0)
    tx = gs.stabilize(optax.sgd(1.0), clip=None, limit_updates=False)
    plain, _ = tx.update(g, tx.init(PARAMS))
    expected, _ = optax.sgd(1.0).update(g, optax.sgd(1.0).init(PARAMS))
    assert bits(plain) == bits(expected)
    tx = gs.stabilize(optax.sgd(1.0), clip=gs.clip_by_value(0.5), limit_updates=False)
    updates, _ = tx.update(g, tx.init(PARAMS))
    assert max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(updates)) == 0.5


@pytest.mark.parametrize("name", ["split_magnitude", "clip_update_relative", "add_l2", "decay"])
def test_clip_names_come_from_the_table_of_clippers_only(name):
    assert callable(getattr(gs, name))  # a public name, but not a gradient clipper
    with pytest.raises(ValueError, match="clip"):
        gs.stabilize(optax.sgd(1.0), clip=name)


@pytest.mark.parametrize("name", gs._presets.CLIPPER_NAMES)
def test_named_clippers_build_and_run(name):
    tx = gs.stabilize(optax.sgd(0.1), clip=name)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    for i in range(3):
        updates, state = update(grads(i + 1.0), state, PARAMS, value=jnp.array(1.0))
    assert name in guards_outside_in(state)
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))


def test_default_clip_is_zclip():
    tx = gs.stabilize(optax.sgd(0.1))
    state = tx.init(PARAMS)
    _, state = tx.update(grads(), state, PARAMS)
    assert guards_outside_in(state) == ["skip_nonfinite", "zclip", "clip_update_relative"]


@pytest.mark.parametrize(
    "limit_updates, relative, absolute",
    [(True, 0.1, 0.01), (0.5, 0.5, 0.01), ({"relative": 0.2, "absolute": 0.0}, 0.2, 0.0)],
)
def test_limit_updates_options(limit_updates, relative, absolute):
    g = grads(50.0)
    tx = gs.stabilize(optax.sgd(1.0), clip=None, limit_updates=limit_updates)
    updates, state = tx.update(g, tx.init(PARAMS), PARAMS)
    hand = gs.clip_update_relative(relative, absolute)
    expected, _ = hand.update(jax.tree.map(lambda x: -x, g), hand.init(PARAMS), PARAMS)
    assert bits(updates) == bits(expected)
    assert bool(gs.metrics(state)["clip_update_relative/clipped"])


def test_the_update_limit_bounds_a_huge_learning_rate():
    """Adam at learning rate 100: every entry moves by at most 0.1 |w| + 0.01 per step."""
    tx = gs.stabilize(optax.adam(100.0))
    state, params = tx.init(PARAMS), PARAMS
    with jax.numpy_dtype_promotion("standard"):  # optax.adam mixes float and int32
        for i in range(5):
            updates, state = tx.update(grads(i + 1.0), state, params)
            bound = jax.tree.map(lambda w: 0.1 * jnp.abs(w) + 0.01, params)
            for u, b in zip(jax.tree.leaves(updates), jax.tree.leaves(bound), strict=True):
                assert bool(jnp.all(jnp.abs(u) <= b * (1 + 1e-6)))
            params = optax.apply_updates(params, updates)


def test_needs_params_unless_the_limit_is_off():
    tx = gs.stabilize(optax.sgd(1.0))
    with pytest.raises(ValueError, match="params") as error:
        tx.update(grads(), tx.init(PARAMS))
    assert "limit_updates=False" in str(error.value) and "clip_update_relative" in str(error.value)
    tx = gs.stabilize(optax.sgd(1.0), limit_updates=False)
    tx.update(grads(), tx.init(PARAMS))


@pytest.mark.parametrize(
    "loss_scale, expected",
    [(True, 2.0**15), ("dynamic", 2.0**15), (256.0, 256.0), ({"init_scale": 4.0}, 4.0)],
)
def test_loss_scale_options(loss_scale, expected):
    tx = gs.stabilize(optax.sgd(0.1), clip=None, loss_scale=loss_scale)
    assert float(gs.loss_scale(tx.init(PARAMS))) == expected


def test_all_devices_refuse_together_under_shard_map():
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    tx = gs.stabilize(
        optax.sgd(1.0), clip="clip_by_global_norm", limit_updates=False, axis_name="d"
    )
    params = jnp.zeros((8, 3))
    state = tx.init(params)
    specs = jax.tree.map(lambda x: P("d") if jnp.ndim(x) == 2 else P(), state)
    run = jax.jit(
        jax.shard_map(
            lambda g, s: tx.update(g, s),
            mesh=mesh,
            in_specs=(P("d"), specs),
            out_specs=(P("d"), specs),
        )
    )
    updates, state = run(jnp.ones((8, 3)).at[2, 0].set(jnp.nan), state)
    np.testing.assert_array_equal(updates, np.zeros((8, 3)))
    assert int(gs.metrics(state)["skip_nonfinite/total_skips"]) == 1
    updates, state = run(jnp.ones((8, 3)), state)
    # The clip's norm covers all devices: sqrt(24) > 1, so every entry is 1/sqrt(24).
    np.testing.assert_allclose(updates, -np.full((8, 3), 1 / np.sqrt(24.0)), rtol=1e-6)


SGD = optax.sgd(1.0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"optimizer": "adam"}, "optimizer"),
        ({"clip": "no_such_clipper"}, "clip"),
        ({"clip": "_guards"}, "clip"),
        ({"clip": "SKIP_REASONS"}, "clip"),
        ({"clip": "metrics"}, "clip"),  # needs arguments
        ({"clip": 3.0}, "clip"),
        ({"skip_nonfinite": "yes"}, "skip_nonfinite"),
        ({"skip_nonfinite": 1}, "skip_nonfinite"),
        ({"skip_spikes": "yes"}, "skip_spikes"),
        ({"skip_spikes": {"window": 1}}, "window"),
        ({"loss_scale": "static"}, "loss_scale"),
        ({"limit_updates": "yes"}, "limit_updates"),
        ({"limit_updates": -0.1}, "relative"),
        ({"limit_updates": {"absolute": -1.0}}, "absolute"),
        ({"loss_scale": -1.0}, "init_scale"),
        ({"axis_name": 5}, "axis_name"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    kwargs = {"optimizer": SGD, "clip": "clip_by_global_norm", **kwargs}
    with pytest.raises(ValueError, match=name):
        gs.stabilize(kwargs.pop("optimizer"), **kwargs)


def test_the_update_limit_is_the_same_sharded_and_whole():
    """Under shard_map each tensor gets one factor for all its shards, as unsharded."""
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    tx = gs.stabilize(optax.sgd(1.0), clip=None, axis_name="d")
    params = jnp.arange(1.0, 25.0).reshape(8, 3)
    g = jnp.ones((8, 3)).at[5, 1].set(30.0)  # one shard holds the entry that sets the factor
    state = tx.init(params)
    specs = jax.tree.map(lambda x: P("d") if jnp.ndim(x) == 2 else P(), state)
    run = jax.jit(
        jax.shard_map(
            lambda g, s, w: tx.update(g, s, w),
            mesh=mesh,
            in_specs=(P("d"), specs, P("d")),
            out_specs=(P("d"), specs),
        )
    )
    sharded, _ = run(g, state, params)
    whole = gs.stabilize(optax.sgd(1.0), clip=None)
    expected, _ = whole.update(g, whole.init(params), params)
    np.testing.assert_allclose(sharded, expected, rtol=1e-6)
    assert float(jnp.max(jnp.abs(sharded / g))) < 1  # the factor came from another shard


def test_inject_hyperparams_with_an_update_limit_number_under_jit():
    tx = optax.inject_hyperparams(gs.stabilize)(optax.sgd(1.0), clip=None, limit_updates=0.2)
    state = tx.init(PARAMS)
    assert float(state.hyperparams["limit_updates"]) == pytest.approx(0.2)
    updates, state = jax.jit(tx.update)(grads(100.0), state, PARAMS)
    expected, _ = gs.stabilize(optax.sgd(1.0), clip=None, limit_updates=0.2).update(
        grads(100.0),
        gs.stabilize(optax.sgd(1.0), clip=None, limit_updates=0.2).init(PARAMS),
        PARAMS,
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates, expected)
    # A smaller limit injected at run time takes effect without rebuilding.
    state.hyperparams["limit_updates"] = jnp.asarray(0.05, jnp.float32)
    smaller, _ = jax.jit(tx.update)(grads(100.0), state, PARAMS)
    for u, e in zip(jax.tree.leaves(smaller), jax.tree.leaves(expected), strict=True):
        assert float(jnp.max(jnp.abs(u))) < float(jnp.max(jnp.abs(e)))


@pytest.mark.parametrize("skip_nonfinite", [True, "gradient", "full"])
def test_skip_nonfinite_check_options(skip_nonfinite):
    tx = gs.stabilize(optax.adam(0.1), skip_nonfinite=skip_nonfinite)
    state = tx.init(PARAMS)
    with jax.numpy_dtype_promotion("standard"):
        updates, state = tx.update(grads(bad=jnp.nan), state, PARAMS)
    assert gs.skip_reason(state) == "nonfinite_gradient"
    assert all(not np.asarray(u).any() for u in jax.tree.leaves(updates))


def test_a_gradient_whose_square_overflows_never_reaches_the_parameters():
    tx = gs.stabilize(optax.adam(0.1))
    state = tx.init(PARAMS)
    step = jax.jit(tx.update)
    with jax.numpy_dtype_promotion("standard"):
        _, state = step(grads(), state, PARAMS)
        before = jax.tree.map(np.array, state)
        updates, after = step(grads(1e30), state, PARAMS)
    assert gs.skip_reason(after) == "gradient_overflow"
    assert all(not np.asarray(u).any() for u in jax.tree.leaves(updates))
    assert bits(after.inner_state) == bits(before.inner_state)


def test_default_stack_state_can_be_donated():
    """The README's train step donates the state: the default stack's leaves (ZClip's
    statistics among them) must not share buffers, or XLA refuses the donation."""
    tx = gs.stabilize(optax.adam(1e-3))
    params = {"w": jnp.ones(4)}
    step = jax.jit(lambda s, g: tx.update(g, s, params)[1], donate_argnums=0)
    with jax.numpy_dtype_promotion("standard"):  # optax.adam mixes float and int32
        state = step(step(tx.init(params), params), params)
    assert gs.metrics(state)["zclip/count"] == 2
