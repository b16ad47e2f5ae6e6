"""(IA)^3: PEFT's default targets, the scaling formula on a projection, merging, the
trainable set and its parameter count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack.config import ConfigError
from lmstack.models.projection import IA3Param, Projection
from lmstack.peft.ia3 import apply_ia3, ia3_parameter_count, merge_ia3
from tests.peft.common import VOCAB, assert_only_adapters_train, build, tiny_cfg, train_steps

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 8)), jnp.int32)


def _scales(model):
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, IA3Param))}


def test_default_targets_are_keys_values_and_the_down_input_and_start_at_one():
    base, _ = build()
    model, mcfg = build("ia3")
    np.testing.assert_array_equal(model(TOKENS), base(TOKENS))
    scales = _scales(model)
    assert {p: v.shape for p, v in scales.items()} == {
        "blocks.attn.k.ia3_out": (2, 2, 8), "blocks.attn.v.ia3_out": (2, 2, 8), "blocks.mlp.down.ia3_in": (2, 64)}
    assert all(np.all(np.asarray(v[...]) == 1.0) for v in scales.values())
    assert sum(v.size for v in scales.values()) == ia3_parameter_count(mcfg) == 2 * (2 * 2 * 8 + 64)


def test_smollm2_135m_shapes_count():
    from lmstack.trainstate import model_factory

    c = tiny_cfg("ia3")
    c.model.update(d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536)
    make, mcfg = model_factory(c, vocab_size=49152)
    shapes = nnx.eval_shape(make)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(shapes, IA3Param))) == ia3_parameter_count(mcfg) == 57_600


class _Two(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(params=0)
        self.k = Projection((6,), (2, 3), ("embed", "kv_heads", "head_dim"), std=0.3, bias=True, rngs=rngs)
        self.down = Projection((5,), (4,), ("mlp", "embed"), std=0.3, bias=True, rngs=rngs)


def test_output_and_input_scaling_follow_peft_ia3_linear():
    m = _Two()
    apply_ia3(m, "k,down", "down")
    rng = np.random.default_rng(1)
    for p, v in _scales(m).items():
        v[...] = jnp.asarray(rng.uniform(0.5, 1.5, v.shape), jnp.float32)
    m.k.bias[...] = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
    m.down.bias[...] = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
    x6, x5 = rng.normal(size=(3, 6)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
    wk, bk, lk = (np.asarray(v[...], np.float64) for v in (m.k.weight, m.k.bias, m.k.ia3_out))
    want_k = (x6 @ wk.reshape(6, 6) + bk.reshape(6)) * lk.reshape(6)  # (x W + b) * l: bias scaled too
    wd, bd, ld = (np.asarray(v[...], np.float64) for v in (m.down.weight, m.down.bias, m.down.ia3_in))
    want_down = (x5 * ld) @ wd + bd  # feed-forward: (x * l) W + b
    np.testing.assert_allclose(np.asarray(m.k(jnp.asarray(x6))).reshape(3, 6), want_k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(m.down(jnp.asarray(x5))), want_down, rtol=1e-5, atol=1e-6)
    assert m.k.ia3_in is None and m.down.ia3_out is None


def test_merge_folds_the_scales_into_the_weights():
    model, _ = build("ia3", target_modules="k,v,o,up,down", feedforward_modules="o,down")
    rng = np.random.default_rng(2)
    for v in _scales(model).values():
        v[...] = jnp.asarray(rng.uniform(0.5, 1.5, v.shape), jnp.float32)
    with_scales = np.asarray(model(TOKENS))
    assert merge_ia3(model) == 5
    assert all(np.all(np.asarray(v[...]) == 1.0) for v in _scales(model).values())
    np.testing.assert_allclose(np.asarray(model(TOKENS)), with_scales, atol=1e-5, rtol=1e-5)


def test_bad_feedforward_modules_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"^peft.feedforward_modules='up' selects blocks.mlp.up, which "
                                          r"peft.target_modules='k,v,down' does not: feed-forward modules must be "
                                          r"targets too$"):
        build("ia3", feedforward_modules="up")
    with pytest.raises(ConfigError, match=r"^peft.feedforward_modules='down_proj' matches no projection of Decoder"):
        build("ia3", feedforward_modules="down_proj")


def test_ia3_trains_only_its_scales():
    before, after, losses = train_steps(tiny_cfg("ia3"))
    assert_only_adapters_train(before, after, losses, ["blocks.attn.k.ia3_out", "blocks.attn.v.ia3_out",
                                                       "blocks.mlp.down.ia3_in"])


def test_ia3_reaches_the_encoder_family():
    from lmstack.config import compose
    from lmstack.configs.base import base_config
    from lmstack.trainstate import model_factory

    def encoder(method):
        c = base_config()
        c.model.name = "encoder"
        c.model.update(d_model=32, n_layers=2, n_heads=4, d_ff=64)
        c.peft.name = method
        return model_factory(compose(c), vocab_size=VOCAB)[0]()

    base, model = encoder("none"), encoder("ia3")
    assert sorted(_scales(model)) == ["blocks.attn.k.ia3_out", "blocks.attn.v.ia3_out", "blocks.mlp.down.ia3_in"]
    np.testing.assert_array_equal(model(TOKENS), base(TOKENS))
