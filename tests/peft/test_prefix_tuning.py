"""Prefix tuning: attention with the learned keys/values in front (numpy reference), cached
decoding, the trainable set, the count and the family check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack.config import ConfigError, compose, validate
from lmstack.configs.base import base_config
from lmstack.models.decoder import DecoderConfig
from lmstack.models.layers import Attention, attention_mask
from lmstack.peft.prefix_tuning import PrefixParam, prefix_tuning_parameter_count
from tests.numpy_llama import softmax
from tests.peft.common import VOCAB, assert_only_adapters_train, build, tiny_cfg, train_steps

CFG = DecoderConfig(style="llama", vocab_size=VOCAB, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=6,
                    d_ff=32, max_seq_len=16, rope_theta=100.0, init_std=0.3)


def np_rope(x_tnh, pos_t, theta):
    """Rotate-half RoPE at the given positions (HF Llama)."""
    h = x_tnh.shape[-1]
    ang = pos_t[:, None] * theta ** (-np.arange(0, h, 2) / h)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x_tnh[..., : h // 2], x_tnh[..., h // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def test_attention_attends_to_the_prefix_from_every_segment_without_rope():
    attn = Attention(CFG, rngs=nnx.Rngs(params=0))
    rng = np.random.default_rng(1)
    n_virtual, k, h = 3, CFG.n_kv_heads, CFG.head_dim
    pk, pv = rng.normal(size=(n_virtual, k, h)), rng.normal(size=(n_virtual, k, h))
    attn.prefix_k = PrefixParam(jnp.asarray(pk, jnp.float32))
    attn.prefix_v = PrefixParam(jnp.asarray(pv, jnp.float32))
    t = 7
    x = rng.normal(size=(1, t, CFG.d_model)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 2, 2]])
    pos = np.array([[0, 1, 2, 0, 1, 2, 3]])
    row = np.arange(t)[None]
    mask = attention_mask(jnp.asarray(seg), jnp.asarray(seg), jnp.asarray(row), jnp.asarray(row))
    ours, _ = attn(jnp.asarray(x), jnp.asarray(pos), mask, None, None)

    w = {n: np.asarray(getattr(attn, n).weight[...], np.float64) for n in "qkvo"}
    xs = x[0].astype(np.float64)
    q = np_rope(np.einsum("td,dnh->tnh", xs, w["q"]), pos[0], CFG.rope_theta)
    kk = np.concatenate([pk, np_rope(np.einsum("td,dkh->tkh", xs, w["k"]), pos[0], CFG.rope_theta)])
    vv = np.concatenate([pv, np.einsum("td,dkh->tkh", xs, w["v"])])
    g = CFG.n_heads // k
    kk, vv = np.repeat(kk, g, axis=1), np.repeat(vv, g, axis=1)
    visible = np.concatenate([np.ones((t, n_virtual), bool),
                              (seg[0][:, None] == seg[0][None]) & (row[0][:, None] >= row[0][None])], axis=1)
    scores = np.where(visible, np.einsum("tnh,snh->nts", q, kk) / np.sqrt(h), -np.inf)
    out = np.einsum("nts,snh->tnh", softmax(scores), vv)
    want = np.einsum("tnh,nhd->td", out, w["o"])
    assert np.abs(want).max() > 0.5
    np.testing.assert_allclose(np.asarray(ours)[0], want, atol=1e-5, rtol=0)


def test_prefix_changes_the_model_and_cached_decoding_matches_the_full_forward():
    base, _ = build()
    model, _ = build("prefix_tuning", num_virtual_tokens=4)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (2, 8)), jnp.int32)
    full = np.asarray(model(tokens))
    assert np.abs(full - np.asarray(base(tokens))).max() > 1e-3  # N(0, 1) prefixes: not the base model
    logits, cache = model(tokens[:, :6], cache=model.init_cache(2, 8))
    steps = [np.asarray(logits)]
    for i in (6, 7):
        logits, cache = model(tokens[:, i:i + 1], cache=cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


def test_count_is_layers_times_two_times_virtual_times_kv_width():
    model, mcfg = build("prefix_tuning", num_virtual_tokens=4)
    got = sum(x.size for x in jax.tree.leaves(nnx.state(model, PrefixParam)))
    assert model.blocks.attn.prefix_k.shape == (2, 4, 2, 8)
    assert got == prefix_tuning_parameter_count(mcfg, 4) == 2 * 2 * 4 * 2 * 8
    smol = DecoderConfig(style="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         head_dim=64, d_ff=1536, max_seq_len=2048)
    assert prefix_tuning_parameter_count(smol, 20) == 230_400


def test_prefix_tuning_trains_only_the_prefixes():
    before, after, losses = train_steps(tiny_cfg("prefix_tuning", num_virtual_tokens=4))
    assert_only_adapters_train(before, after, losses, ["blocks.attn.prefix_k", "blocks.attn.prefix_v"])


def test_other_families_and_empty_prefixes_are_config_errors():
    c = base_config()
    c.model.name, c.peft.name, c.peft.num_virtual_tokens = "encoder_decoder", "prefix_tuning", 0
    with pytest.raises(ConfigError, match=r"peft.name=prefix_tuning supports model.name=decoder, not "
                                          r"'encoder_decoder': .*; peft.num_virtual_tokens=0: must be at least 1"):
        validate(compose(c))
