"""Guards in a real Flax training loop: fault injection campaigns and float16 loss scaling."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradsafe as gs

REASON = {name: code for code, name in enumerate(gs.SKIP_REASONS)}

# Fault kinds injected into a step: into one gradient entry, the whole gradient, or the loss.
CLEAN, NAN_GRAD, INF_GRAD, BIG_GRAD, HUGE_GRAD, NAN_LOSS, INF_LOSS, HUGE_LOSS = range(8)
FAULTS = (NAN_GRAD, INF_GRAD, BIG_GRAD, HUGE_GRAD, NAN_LOSS, INF_LOSS, HUGE_LOSS)
HUGE = 1e30  # makes Adam's g^2 (and the float32 squared global norm) overflow
BIG = 1e4  # large but harmless to Adam's state


class MLP(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(16, dtype=self.dtype)(x))
        return nn.Dense(1, dtype=self.dtype)(x)


X = jax.random.normal(jax.random.PRNGKey(0), (128, 6))
Y = 0.5 * jnp.sin(2.0 * X[:, :1])
PARAMS = MLP().init(jax.random.PRNGKey(1), X)


def mse(params, dtype=jnp.float32, loss_mult=1.0):
    pred = MLP(dtype).apply(params, X.astype(dtype)).astype(jnp.float32)
    return jnp.mean(jnp.square(pred - Y)) * jnp.float32(loss_mult)


def adam(learning_rate):
    """``optax.adam``; its bias correction mixes float and int32, which strict promotion refuses."""
    tx = optax.adam(learning_rate)

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(tx.init, update)


def inject(grads, loss, kind):
    """The gradient and loss of a step with fault ``kind`` (an int32 scalar) injected."""
    leaves, treedef = jax.tree.flatten(grads)
    first = leaves[0].ravel()
    entry = jnp.where(kind == NAN_GRAD, jnp.nan, jnp.where(kind == INF_GRAD, -jnp.inf, first[0]))
    leaves[0] = first.at[0].set(entry).reshape(leaves[0].shape)
    mult = jnp.where(kind == BIG_GRAD, BIG, jnp.where(kind == HUGE_GRAD, HUGE, 1.0))
    grads = jax.tree.unflatten(treedef, [g * mult.astype(g.dtype) for g in leaves])
    loss = jnp.where(kind == NAN_LOSS, jnp.nan, jnp.where(kind == INF_LOSS, jnp.inf, loss))
    loss = jnp.where(kind == HUGE_LOSS, loss * HUGE, loss)
    return grads, loss


@functools.cache
def train_step(name):
    tx = TRANSFORMS[name]()

    def step(params, state, kind):  # returns the (scaled, injected) gradient and the loss
        scale = gs.loss_scale(state)  # 1.0 without dynamic_loss_scale
        scaled_loss, grads = jax.value_and_grad(lambda p: mse(p) * scale)(params)
        grads, loss = inject(grads, scaled_loss / scale, kind)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state, grads, loss

    return tx, jax.jit(step)


TRANSFORMS = {
    "skip_nonfinite": lambda: gs.skip_nonfinite(adam(1e-2)),
    "skip_on_spike": lambda: gs.skip_on_spike(adam(1e-2), sigma=6.0, window=16, min_history=8),
    "dynamic_loss_scale": lambda: gs.dynamic_loss_scale(
        adam(1e-2), init_scale=2.0**15, growth_interval=5
    ),
    "stabilize": lambda: gs.stabilize(
        adam(1e-2),
        clip="clip_by_global_norm",
        skip_spikes={"window": 16, "min_history": 8},
        loss_scale={"growth_interval": 5},
    ),
}


def bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


class SpikeModel:
    """Plain-Python model of skip_on_spike's window (sigma 6, window 16, min_history 8)."""

    def __init__(self):
        self.history = {"loss": [], "norm": []}

    def spikes(self, name, x):
        hist = self.history[name]
        if len(hist) < 8:
            return False
        values = np.array(hist[-16:], np.float64)
        return x - values.mean() > 6.0 * values.std(ddof=1)

    def record(self, loss, norm):
        for name, x in (("loss", loss), ("norm", norm)):
            if np.isfinite(x):
                self.history[name].append(x)


def expected_reason(name, grads, loss, spike_model):
    """Why the stack must refuse this step (or "accepted"), from the unscaled gradient."""
    flat = np.concatenate([np.ravel(np.asarray(g, np.float32)) for g in jax.tree.leaves(grads)])
    if not np.isfinite(flat).all():
        return "nonfinite_gradient"
    with np.errstate(over="ignore"):
        norm = float(np.sqrt(np.sum(np.square(flat), dtype=np.float32)))  # float32, as ours
    # skip_nonfinite and dynamic_loss_scale (the outermost guard of this stabilize) decide from
    # the gradient: a squared norm that overflows is refused before the loss is looked at.
    if name != "skip_on_spike" and not np.isfinite(norm):
        return "gradient_overflow"
    if not np.isfinite(loss):
        return "nonfinite_loss"
    if name in ("skip_on_spike", "stabilize"):
        if spike_model.spikes("loss", float(loss)):
            return "loss_spike"
        if not np.isfinite(norm) or spike_model.spikes("norm", norm):
            return "norm_spike"  # skip_on_spike: Adam's second moment would overflow too
    return "accepted"


def innermost(state):
    while hasattr(state, "inner_state"):
        state = state.inner_state
    return state


def guard_verdicts(state):
    """[(guard name, reason code)] from the outermost guard inward."""
    m = gs.metrics(state)
    names = [k.removesuffix("/skipped") for k in m if k.endswith("/skipped")]
    return [(g, int(m[g + "/reason"])) for g in names], m


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_fault_injection_campaign(name):
    tx, step = train_step(name)
    rng = np.random.default_rng(sum(map(ord, name)))
    runs, steps = 5, 24
    refusals = 0
    for _ in range(runs):
        params, state = PARAMS, tx.init(PARAMS)
        spike_model = SpikeModel()
        guards = [g for g, _ in guard_verdicts(state)[0]]
        consecutive, total = dict.fromkeys(guards, 0), dict.fromkeys(guards, 0)
        kinds = np.where(rng.random(steps) < 0.3, rng.choice(FAULTS, steps), CLEAN)
        for kind in kinds:
            inverse_scale = np.float32(1) / np.float32(gs.loss_scale(state))
            new_params, new_state, grads, loss = step(params, state, jnp.int32(kind))
            assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(new_params))
            unscaled = jax.tree.map(lambda g, s=inverse_scale: np.asarray(g) * s, grads)
            previous = gs.metrics(state)
            verdicts, m = guard_verdicts(new_state)
            refusing = next((i for i, (_, r) in enumerate(verdicts) if r), len(verdicts))
            reason = gs.SKIP_REASONS[verdicts[refusing][1]] if refusing < len(verdicts) else None
            expected = expected_reason(name, unscaled, float(loss), spike_model)
            assert (reason or "accepted") == expected, (kind, reason, expected)
            for i, guard in enumerate(guards):
                if i < refusing:
                    consecutive[guard] = 0
                elif i == refusing:
                    consecutive[guard] += 1
                    total[guard] += 1
                assert int(m[guard + "/consecutive_skips"]) == consecutive[guard]
                assert int(m[guard + "/total_skips"]) == total[guard]
                if i <= refusing:
                    assert bool(m[guard + "/skipped"]) == (i == refusing)
                else:  # an outer guard refused: this one's state, stats included, is kept
                    assert bool(m[guard + "/skipped"]) == bool(previous[guard + "/skipped"])
            if reason is not None:
                refusals += 1
                assert bits(innermost(new_state)) == bits(innermost(state))
                assert bits(new_params) == bits(params)
            else:
                spike_model.record(float(loss), float(m.get("skip_on_spike/norm", np.nan)))
            params, state = new_params, new_state
    assert refusals > runs * steps * 0.15  # the campaign did exercise refusals


def test_every_nonfinite_fault_is_refused_by_every_guard():
    for name in TRANSFORMS:
        tx, step = train_step(name)
        params, state = PARAMS, tx.init(PARAMS)
        for kind in (NAN_GRAD, INF_GRAD, NAN_LOSS, INF_LOSS, CLEAN):
            params, state, _, _ = step(params, state, jnp.int32(kind))
            assert bool(state.skipped) == (kind != CLEAN), (name, kind)
        assert int(state.total_skips) == 4 and int(state.consecutive_skips) == 0


@pytest.mark.parametrize("name", ["skip_nonfinite", "skip_on_spike", "dynamic_loss_scale"])
def test_clean_run_is_unchanged_by_the_wrapper(name):
    tx = TRANSFORMS[name]()
    bare = adam(1e-2)
    # The same compiled gradient for both; only the optimizer update differs.
    grad = jax.jit(lambda p, scale: jax.grad(lambda q: mse(q) * scale)(p))
    update, bare_update = jax.jit(tx.update), jax.jit(bare.update)
    apply, loss = jax.jit(optax.apply_updates), jax.jit(mse)
    params, state = PARAMS, tx.init(PARAMS)
    bare_params, bare_state = PARAMS, bare.init(PARAMS)
    for _ in range(15):
        grads = grad(params, gs.loss_scale(state))
        updates, state = update(grads, state, params, value=loss(params))
        params = apply(params, updates)
        assert not bool(state.skipped)
        bare_grads = grad(bare_params, jnp.float32(1))
        bare_updates, bare_state = bare_update(bare_grads, bare_state, bare_params)
        bare_params = apply(bare_params, bare_updates)
        if name != "dynamic_loss_scale":
            assert bits(updates) == bits(bare_updates)
    # dynamic_loss_scale: the unscaled gradient is exact (power-of-two scales), but the
    # unscaling multiply is fused into Adam's kernel, where the compiler may round differently.
    if name == "dynamic_loss_scale":
        close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-8)
        jax.tree.map(close, params, bare_params)
        jax.tree.map(close, state.inner_state, bare_state)
        assert float(gs.loss_scale(state)) == 2.0**15 * 2**3  # grew every 5 clean steps
    else:
        assert bits(params) == bits(bare_params)
        assert bits(state.inner_state) == bits(bare_state)


# ------------------------------------------------------------------------------------------
# float16 with dynamic loss scaling
# ------------------------------------------------------------------------------------------

LOSS_MULT = 1e-6  # small loss: its float16 gradients underflow unless the loss is scaled


@functools.cache
def training_run(dtype, tx, steps=100):
    """Mixed precision, float32 master weights: (params, state) -> (params, state) after
    ``steps`` (float16 compute when ``dtype`` is float16)."""

    def step(carry, _):
        params, state = carry
        scale = gs.loss_scale(state)
        grads = jax.grad(lambda p: mse(p, dtype, LOSS_MULT) * scale)(params)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    return jax.jit(lambda carry: jax.lax.scan(step, carry, None, length=steps)[0])


def final_loss(dtype, tx, state=None):
    params, state = training_run(dtype, tx)((PARAMS, tx.init(PARAMS) if state is None else state))
    return float(mse(params)), state


def test_float16_with_dynamic_loss_scale_reaches_the_float32_loss():
    optimizer = adam(3e-3)
    f32, _ = final_loss(jnp.float32, optimizer)
    f16_unscaled, _ = final_loss(jnp.float16, optimizer)
    tx = gs.dynamic_loss_scale(optimizer, growth_interval=30)
    f16, state = final_loss(jnp.float16, tx)
    initial = float(mse(PARAMS))
    assert f16 == pytest.approx(f32, rel=0.02)
    assert f16_unscaled > f32 + 0.5 * (initial - f32)  # underflow: most of the progress lost
    assert float(gs.loss_scale(state)) > 2.0**15  # it grew
    # Starting far too high, the scale backs off on overflows and training still gets there.
    high = tx.init(PARAMS)._replace(loss_scale=jnp.float32(2.0**60))
    f16_high, state = final_loss(jnp.float16, tx, high)
    assert int(state.total_skips) > 5 and float(gs.loss_scale(state)) < 2.0**60
    assert f16_high == pytest.approx(f32, rel=0.1)
