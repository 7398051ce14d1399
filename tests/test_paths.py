"""Parameter paths and path masks: strings, selection rules, use with Optax and gradsafe."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gradsafe as gs
from gradsafe._paths import leaves_with_paths, path_str


def model_params():
    return {
        "encoder": {
            "layer_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
            "norm": {"scale": jnp.ones(3), "bias": jnp.ones(3)},
        },
        "head": {"kernel": jnp.ones((3, 1)), "bias": jnp.ones(1)},
        "blocks": [{"kernel": jnp.ones(2)}, {"kernel": jnp.ones(2)}],
    }


# ------------------------------------------------------------------------------------------
# path strings (existing helpers, checked so that masks can rely on them)
# ------------------------------------------------------------------------------------------


def test_path_str_and_leaves_with_paths():
    paths = [path for path, _ in leaves_with_paths(model_params())]
    assert paths == [
        "blocks/0/kernel",
        "blocks/1/kernel",
        "encoder/layer_0/bias",
        "encoder/layer_0/kernel",
        "encoder/norm/bias",
        "encoder/norm/scale",
        "head/bias",
        "head/kernel",
    ]
    assert path_str(()) == ""


def test_path_str_of_namedtuple_attributes():
    state = optax.ScaleByAdamState(count=jnp.zeros([]), mu={"w": 1.0}, nu={"w": 2.0})
    paths = [path for path, _ in leaves_with_paths(state)]
    assert paths == ["count", "mu/w", "nu/w"]


# ------------------------------------------------------------------------------------------
# selection rules
# ------------------------------------------------------------------------------------------


def selected(mask, tree):
    return {path for path, leaf in leaves_with_paths(mask(tree)) if leaf}


def test_no_patterns_selects_everything():
    params = model_params()
    assert selected(gs.path_mask(), params) == {p for p, _ in leaves_with_paths(params)}


def test_include_and_exclude():
    params = model_params()
    assert selected(gs.path_mask(include="head"), params) == {"head/bias", "head/kernel"}
    no_decay = gs.path_mask(exclude=[r"bias$", r"norm/scale$"])
    assert selected(no_decay, params) == {
        "blocks/0/kernel",
        "blocks/1/kernel",
        "encoder/layer_0/kernel",
        "head/kernel",
    }
    both = gs.path_mask(include=r"^encoder/", exclude="norm")
    assert selected(both, params) == {"encoder/layer_0/bias", "encoder/layer_0/kernel"}


def test_search_semantics_and_anchoring():
    tree = {"bias": 1.0, "bias_proj": {"kernel": 2.0}, "x": {"bias": 3.0}}
    assert selected(gs.path_mask(include="bias"), tree) == {"bias", "bias_proj/kernel", "x/bias"}
    assert selected(gs.path_mask(include=r"(^|/)bias$"), tree) == {"bias", "x/bias"}


def test_sequence_indices_and_compiled_patterns():
    params = model_params()
    mask = gs.path_mask(include=[re.compile(r"blocks/1/"), r"HEAD/KERNEL$"])
    assert selected(mask, params) == {"blocks/1/kernel"}
    mask = gs.path_mask(include=re.compile(r"head/kernel$", re.IGNORECASE))
    assert selected(mask, {"Head": {"Kernel": 1.0}}) == {"Head/Kernel"}


def test_mask_keeps_structure_and_none_leaves():
    tree = {"a": jnp.ones(2), "b": None, "c": (jnp.ones(1), jnp.ones(1))}
    mask = gs.path_mask(exclude="c/1")(tree)
    assert mask == {"a": True, "b": None, "c": (True, False)}
    assert jax.tree.structure(mask) == jax.tree.structure(tree)
    assert gs.path_mask()({}) == {}


def test_equality_hash_and_repr():
    a = gs.path_mask(include="head", exclude=["bias"])
    b = gs.path_mask(include=["head"], exclude="bias")
    assert a == b and hash(a) == hash(b)
    assert a != gs.path_mask(include="head")
    assert repr(a) == "path_mask(include=['head'], exclude=['bias'])"


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"include": "("}, "include"),
        ({"exclude": ["ok", "[unclosed"]}, "exclude"),
        ({"include": 3}, "include"),
        ({"exclude": [b"bytes"]}, "exclude"),
        ({"include": {"a": "b"}}, "include"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        gs.path_mask(**kwargs)


names = st.text(alphabet="abk_0", min_size=1, max_size=4)


@given(st.dictionaries(names, st.dictionaries(names, st.just(0.0), max_size=3), max_size=4))
def test_include_and_exclude_partition_the_leaves(tree):
    include = gs.path_mask(include="k")(tree)
    exclude = gs.path_mask(exclude="k")(tree)
    for path, chosen in leaves_with_paths(include):
        assert chosen == ("k" in path)
    for a, b in zip(jax.tree.leaves(include), jax.tree.leaves(exclude), strict=True):
        assert a != b


# ------------------------------------------------------------------------------------------
# use with Optax and gradsafe
# ------------------------------------------------------------------------------------------


def test_optax_masked_and_add_decayed_weights():
    params = model_params()
    no_decay = gs.path_mask(exclude=[r"bias$", r"norm/scale$"])
    tx = optax.add_decayed_weights(0.5, mask=no_decay)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    for path, leaf in leaves_with_paths(updates):
        expected = 0.0 if path.endswith("bias") or path.endswith("norm/scale") else 0.5
        np.testing.assert_array_equal(leaf, expected)


def test_gradsafe_mask_and_agc_exclude():
    params = model_params()
    grads = jax.tree.map(lambda x: 100.0 * x, params)
    agc = gs.adaptive_grad_clip(0.01, exclude=gs.path_mask(include="^head/"))
    clipped, _ = agc.update(grads, agc.init(params), params)
    np.testing.assert_array_equal(clipped["head"]["kernel"], grads["head"]["kernel"])
    assert float(jnp.max(clipped["encoder"]["layer_0"]["kernel"])) < 1.0

    tx = gs.add_l2(1.0, mask=gs.path_mask(include="^blocks/"))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_array_equal(updates["blocks"][0]["kernel"], [1.0, 1.0])
    np.testing.assert_array_equal(updates["head"]["kernel"], np.zeros((3, 1)))


def test_flax_nnx_state_paths():
    from flax import nnx

    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    mask = gs.path_mask(exclude=r"bias")(state)
    flags = {path: leaf for path, leaf in leaves_with_paths(mask)}
    assert any(path.startswith("bias") for path in flags) and any("kernel" in p for p in flags)
    assert all(flag == ("kernel" in path) for path, flag in flags.items())
