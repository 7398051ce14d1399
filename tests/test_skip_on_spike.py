"""skip_on_spike gives up refusing a new level after ``max_consecutive_skips`` refusals in a row
and re-bases its statistics; non-finite steps are still always refused."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gradsafe as gs


def run(tx, losses, grads=None, jit=True):
    """Feed ``losses`` (and gradients, ones by default); returns the list of states."""
    state = tx.init(jnp.zeros(2))
    update = jax.jit(tx.update) if jit else tx.update
    states = []
    for step, loss in enumerate(losses):
        g = jnp.ones(2) if grads is None else grads[step]
        _, state = update(g, state, value=jnp.asarray(loss, jnp.float32))
        states.append(state)
    return states


BASE = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95]


def test_new_level_is_accepted_after_max_consecutive_skips_and_windows_restart():
    tx = gs.skip_on_spike(
        optax.sgd(0.1), window=8, min_history=4, watch=("loss",), max_consecutive_skips=3
    )
    states = run(tx, BASE + [5.0] * 8)
    skipped = [bool(s.skipped) for s in states]
    assert skipped == [False] * 6 + [True] * 3 + [False] * 5
    rebased = states[9]
    assert int(rebased.loss_count) == 1  # the window restarted from the new level
    assert float(rebased.loss_window[-1]) == 5.0
    assert int(rebased.norm_count) == 1
    assert int(states[-1].total_skips) == 3


def test_detection_resumes_after_min_history_values_of_the_new_level():
    tx = gs.skip_on_spike(
        optax.sgd(0.1), window=8, min_history=4, watch=("loss",), max_consecutive_skips=2
    )
    new_level = [5.0, 5.1, 4.9, 5.0, 5.05, 4.95]  # two refused, then accepted and re-based
    states = run(tx, BASE + new_level + [50.0])
    assert bool(states[-1].skipped)
    assert gs.SKIP_REASONS[int(states[-1].reason)] == "loss_spike"
    assert float(states[-1].loss_mean) == pytest.approx(np.mean(new_level[2:]), rel=1e-5)


def test_none_refuses_a_new_level_forever():
    tx = gs.skip_on_spike(
        optax.sgd(0.1), window=8, min_history=4, watch=("loss",), max_consecutive_skips=None
    )
    states = run(tx, BASE + [5.0] * 20)
    assert all(bool(s.skipped) for s in states[6:])
    assert int(states[-1].consecutive_skips) == 20


def test_isolated_spikes_are_still_refused():
    tx = gs.skip_on_spike(optax.sgd(0.1), window=8, min_history=4, max_consecutive_skips=3)
    losses = [*BASE, 9.0, 1.0, 1.02, 9.0, 0.98, 9.0, 9.0, 1.0]
    skipped = [bool(s.skipped) for s in run(tx, losses)]
    assert skipped == [False] * 6 + [True, False, False, True, False, True, True, False]


def test_norm_level_change_is_accepted_too():
    grads = [jnp.full(2, v) for v in [1.0, 1.1, 0.9, 1.0, 1.05, 0.95] + [20.0] * 6]
    tx = gs.skip_on_spike(
        optax.sgd(0.1), window=8, min_history=4, watch=("norm",), max_consecutive_skips=4
    )
    states = run(tx, [1.0] * 12, grads=grads)
    assert [bool(s.skipped) for s in states[6:]] == [True] * 4 + [False] * 2
    assert int(states[-1].norm_count) == 2


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_loss_or_gradient_is_never_accepted(bad):
    tx = gs.skip_on_spike(optax.sgd(0.1), window=8, min_history=4, max_consecutive_skips=1)
    states = run(tx, BASE + [bad] * 5)
    assert all(bool(s.skipped) for s in states[6:])
    grads = [jnp.ones(2)] * 6 + [jnp.array([bad, 1.0])] * 5
    states = run(tx, [1.0] * 11, grads=grads)
    assert all(bool(s.skipped) for s in states[6:])
    assert all(gs.SKIP_REASONS[int(s.reason)] == "nonfinite_gradient" for s in states[6:])


def test_giving_up_takes_the_step_the_inner_optimizer_would_take():
    tx = gs.skip_on_spike(
        optax.sgd(0.5), window=8, min_history=4, watch=("loss",), max_consecutive_skips=2
    )
    state = tx.init(jnp.zeros(2))
    for loss in [*BASE, 5.0, 5.0]:
        updates, state = tx.update(jnp.ones(2), state, value=jnp.float32(loss))
    np.testing.assert_array_equal(updates, np.zeros(2))  # second refusal
    updates, state = tx.update(jnp.ones(2), state, value=jnp.float32(5.0))
    np.testing.assert_allclose(updates, [-0.5, -0.5])


@given(
    hnp.arrays(np.float32, (40,), elements=st.floats(0.0, 1e3, width=32)),
    st.integers(1, 5),
)
def test_property_spike_refusals_in_a_row_never_exceed_the_bound(losses, bound):
    tx = gs.skip_on_spike(optax.sgd(0.1), window=6, min_history=3, max_consecutive_skips=bound)

    @jax.jit
    def trajectory(losses):
        def body(state, loss):
            _, state = tx.update(jnp.ones(2), state, value=loss)
            return state, state.consecutive_skips

        return jax.lax.scan(body, tx.init(jnp.zeros(2)), losses)[1]

    assert int(jnp.max(trajectory(jnp.asarray(losses)))) <= bound


def test_jit_and_eager_agree():
    tx = gs.skip_on_spike(optax.sgd(0.1), window=8, min_history=4, max_consecutive_skips=2)
    losses = BASE + [5.0] * 4 + [50.0]
    eager = run(tx, losses, jit=False)
    jitted = run(tx, losses, jit=True)
    for a, b in zip(eager, jitted, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_an_ordinary_step_after_a_run_of_refusals_keeps_the_windows():
    tx = gs.skip_on_spike(optax.sgd(0.1), window=8, min_history=4, max_consecutive_skips=2)
    nan_grads = [jnp.ones(2)] * 6 + [jnp.full(2, jnp.nan)] * 3 + [jnp.ones(2)]
    states = run(tx, BASE + [1.0] * 4, grads=nan_grads)
    assert [bool(s.skipped) for s in states[6:]] == [True, True, True, False]
    # only a spike let through re-bases the statistics; this step was no spike
    assert int(states[-1].loss_count) == 7 and int(states[-1].norm_count) == 7


def test_refusals_of_nonfinite_values_do_not_count_toward_the_bound():
    tx = gs.skip_on_spike(optax.sgd(0.1), window=8, min_history=4, max_consecutive_skips=2)
    grads = [jnp.ones(2)] * 6 + [jnp.full(2, jnp.nan)] * 3 + [jnp.ones(2)] * 3
    states = run(tx, [*BASE, 1.0, 1.0, 1.0, 50.0, 50.0, 50.0], grads=grads)
    # three NaN refusals, then a spike: still refused, twice, and only then taken as a level
    assert [gs.SKIP_REASONS[int(s.reason)] for s in states[6:]] == [
        "nonfinite_gradient", "nonfinite_gradient", "nonfinite_gradient",
        "loss_spike", "loss_spike", "accepted",
    ]  # fmt: skip
    assert [int(s.spike_skips) for s in states[6:]] == [0, 0, 0, 1, 2, 0]
    assert int(states[-1].loss_count) == 1  # re-based on the new level


@pytest.mark.parametrize("bad", [0, -1, 1.5, "8", True])
def test_bad_max_consecutive_skips_names_the_argument(bad):
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        gs.skip_on_spike(optax.sgd(0.1), max_consecutive_skips=bad)


def test_finite_gradient_with_overflowing_norm_is_a_spike_and_not_refused_forever():
    grads = [jnp.ones(2)] * 6 + [jnp.full(2, 1e30)] * 4
    tx = gs.skip_on_spike(
        optax.sgd(1e-3), window=8, min_history=4, watch=("norm",), max_consecutive_skips=2
    )
    states = run(tx, [1.0] * 10, grads=grads)
    # refused twice, accepted, then a new run of refusals begins
    assert [bool(s.skipped) for s in states[6:]] == [True, True, False, True]
    assert gs.SKIP_REASONS[int(states[6].reason)] == "norm_spike"
    assert int(states[8].norm_count) == 0  # an overflowing norm never enters the window
    forever = gs.skip_on_spike(
        optax.sgd(1e-3), window=8, min_history=4, watch=("norm",), max_consecutive_skips=None
    )
    assert all(bool(s.skipped) for s in run(forever, [1.0] * 10, grads=grads)[6:])
