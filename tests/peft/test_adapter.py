"""Bottleneck adapters: unchanged at step 0, the block with adapters against a numpy
reference, placements, the trainable set, the count and bad settings."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack.config import ConfigError, compose, validate
from lmstack.configs.base import base_config
from lmstack.models.decoder import Decoder, DecoderConfig
from lmstack.peft.adapter import AdapterParam, adapter_parameter_count, apply_adapters
from tests import numpy_llama
from tests.models.test_decoder_numpy import as_gguf_layout, randomise
from tests.peft.common import VOCAB, assert_only_adapters_train, build, tiny_cfg, train_steps

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 8)), jnp.int32)


def _adapters(model):
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, AdapterParam))}


@pytest.mark.parametrize("placement,slots", [("houlsby", 2), ("pfeiffer", 1)])
def test_unchanged_at_step_zero_and_count_is_the_formula(placement, slots):
    base, _ = build()
    model, mcfg = build("adapter", bottleneck=8, placement=placement)
    np.testing.assert_array_equal(model(TOKENS), base(TOKENS))  # up = 0: exactly the base model
    found = _adapters(model)
    where = ["attn_adapter", "mlp_adapter"][2 - slots:]
    assert sorted(found) == sorted(f"blocks.{s}.{p}.{w}" for s in where for p in ("down", "up")
                                   for w in ("weight", "bias"))
    assert found[f"blocks.{where[0]}.down.weight"].shape == (2, 32, 8)
    assert not np.asarray(found[f"blocks.{where[0]}.up.weight"][...]).any()
    assert sum(v.size for v in found.values()) == adapter_parameter_count(mcfg, 8, placement)
    assert adapter_parameter_count(mcfg, 8, placement) == 2 * slots * (2 * 32 * 8 + 8 + 32)


def test_smollm2_135m_shapes_count():
    smol = DecoderConfig(style="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         head_dim=64, d_ff=1536, max_seq_len=2048)
    assert adapter_parameter_count(smol, 64, "houlsby") == 4_462_080
    assert adapter_parameter_count(smol, 64, "pfeiffer") == 2_231_040


def test_blocks_with_adapters_match_a_numpy_reference():
    cfg = DecoderConfig(style="llama", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                        d_ff=48, max_seq_len=16, rope_theta=500.0, init_std=0.2)
    model = Decoder(cfg, rngs=nnx.Rngs(params=0))
    randomise(model, seed=1)
    apply_adapters(model, 6, "houlsby", "gelu", jax.random.key(2))
    rng = np.random.default_rng(3)
    for v in _adapters(model).values():  # every adapter weight live, so a misplaced one shows
        v[...] = jnp.asarray(rng.normal(scale=0.3, size=v.shape), jnp.float32)
    tokens = rng.integers(0, VOCAB, (1, 9))
    ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))[0]

    w = as_gguf_layout(model)
    a = {p: np.asarray(v[...], np.float64) for p, v in _adapters(model).items()}

    def adapter(h, slot, i):
        z = h @ a[f"blocks.{slot}.down.weight"][i] + a[f"blocks.{slot}.down.bias"][i]
        z = 0.5 * z * (1 + np.vectorize(math.erf)(z / np.sqrt(2)))  # exact GELU
        return h + z @ a[f"blocks.{slot}.up.weight"][i] + a[f"blocks.{slot}.up.bias"][i]

    x = w["token_embd.weight"][tokens[0]].astype(np.float64)
    for i in range(cfg.n_layers):
        h = numpy_llama.attention(numpy_llama.rms_norm(x, w[f"blk.{i}.attn_norm.weight"], cfg.norm_eps), w, i,
                                  cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta, False)
        x = x + adapter(h, "attn_adapter", i)
        x = x + adapter(numpy_llama.swiglu(numpy_llama.rms_norm(x, w[f"blk.{i}.ffn_norm.weight"], cfg.norm_eps), w, i),
                        "mlp_adapter", i)
    ref = numpy_llama.rms_norm(x, w["output_norm.weight"], cfg.norm_eps) @ w["token_embd.weight"].T
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_adapters_train_and_nothing_else_does():
    before, after, losses = train_steps(tiny_cfg("adapter", bottleneck=4, placement="pfeiffer"))
    assert_only_adapters_train(before, after, losses, [f"blocks.mlp_adapter.{p}.{w}" for p in ("down", "up")
                                                       for w in ("bias", "weight")])


def test_bad_settings_are_config_errors():
    c = base_config()
    c.peft.name = "adapter"
    c.peft.update(placement="parallel", activation="swiglu", bottleneck=0)
    with pytest.raises(ConfigError) as e:
        validate(compose(c))
    msg = str(e.value)
    assert "peft.placement is 'parallel': must be one of houlsby, pfeiffer" in msg
    assert "peft.activation is 'swiglu': must be one of gelu, relu, gelu_tanh" in msg
    assert "peft.bottleneck=0: must be at least 1" in msg
