"""Decoder options the HF families need, each against numpy of its published formula:
Llama 3.1 RoPE scaling, Qwen2 q/k/v biases, Mistral's sliding window, GPT-2's tanh GELU."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack.config import compose
from lmstack.configs.base import base_config
from lmstack.models.decoder import Decoder, DecoderConfig
from lmstack.models.layers import ACTIVATIONS, Attention, Llama3RopeScaling, attention_mask, rope, rope_inv_freq

T = 12
# wavelengths of theta=10000, head_dim 16 span 6 to 20000 positions: with an original context
# of 256 and factors 1 / 4, some frequencies are kept, one interpolated, the rest stretched
SCALING = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=256)


def llama3_inv_freq_numpy(head_dim, theta, factor, low_freq_factor, high_freq_factor, old_context_len):
    """HF transformers ``_compute_llama3_parameters``, transcribed to numpy."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return np.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def rope_numpy(x_tnh, pos_t, inv_freq):
    h = x_tnh.shape[-1]
    ang = pos_t[:, None, None] * inv_freq[None, None, :]
    x1, x2 = x_tnh[..., : h // 2], x_tnh[..., h // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def attention_numpy(x_td, p, *, pos_t, inv_freq, window):
    """Causal GQA self-attention with optional q/k/v biases and a sliding window (float64)."""
    q = np.einsum("td,dnh->tnh", x_td, p["q"]) + p.get("q_bias", 0)
    k = np.einsum("td,dkh->tkh", x_td, p["k"]) + p.get("k_bias", 0)
    v = np.einsum("td,dkh->tkh", x_td, p["v"]) + p.get("v_bias", 0)
    if inv_freq is not None:
        q, k = rope_numpy(q, pos_t, inv_freq), rope_numpy(k, pos_t, inv_freq)
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # query head j reads kv head j // group
    logits = np.einsum("tnh,snh->nts", q, k) / math.sqrt(q.shape[-1])
    t, s = np.arange(len(x_td))[:, None], np.arange(len(x_td))[None, :]
    visible = (s <= t) & ((t - s < window) if window else True)
    logits = np.where(visible[None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("tnh,nhd->td", np.einsum("nts,snh->tnh", probs, v), p["o"])


@nnx.jit
def forward(model, tokens, cache=None):
    return model(tokens, cache=cache)


def decoder_config(**kw):
    base = dict(style="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                d_ff=64, max_seq_len=T, init_std=0.2)
    return DecoderConfig(**(base | kw))


def test_llama3_inverse_frequencies_follow_the_published_formula():
    for head_dim, theta, s in ((16, 10000.0, SCALING), (128, 500000.0, Llama3RopeScaling())):  # ours; Llama 3.1's
        want = llama3_inv_freq_numpy(head_dim, theta, s.factor, s.low_freq_factor, s.high_freq_factor,
                                     s.original_max_position_embeddings)
        got = np.asarray(rope_inv_freq(head_dim, theta, s))
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
        plain = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
        # the three bands are all present: kept, interpolated, divided by the factor
        ratio = want / plain
        assert np.any(ratio == 1.0) and np.any(np.isclose(ratio, 1 / s.factor))
        assert np.any((ratio > 1 / s.factor + 1e-3) & (ratio < 1 - 1e-3))
    x = np.asarray(jax.random.normal(jax.random.key(0), (1, T, 2, 16)))
    pos = np.arange(T) * 7.0
    np.testing.assert_allclose(rope(jnp.asarray(x), jnp.asarray(pos[None]), 10000.0, SCALING)[0],
                               rope_numpy(x[0], pos, rope_inv_freq(16, 10000.0, SCALING)), rtol=0, atol=2e-5)


@pytest.mark.parametrize("qkv_bias, window, scaling", [(True, 0, None), (False, 4, SCALING), (True, 3, SCALING)],
                         ids=["qwen2-bias", "window-llama3", "all"])
def test_attention_matches_numpy(qkv_bias, window, scaling):
    cfg = decoder_config(qkv_bias=qkv_bias)
    attn = Attention(cfg, rngs=nnx.Rngs(params=0), qkv_bias=qkv_bias, rope_scaling=scaling)
    params = nnx.state(attn, nnx.Param)
    if qkv_bias:  # the biases start at zero: give them values so the test sees them
        assert sorted(k for k in params if "bias" in params[k]) == ["k", "q", "v"]  # no o bias (Qwen2)
        for i, name in enumerate("qkv"):
            params[name]["bias"][...] = jax.random.normal(jax.random.key(i + 1), params[name]["bias"][...].shape)
        nnx.update(attn, params)
    else:
        assert not any("bias" in params[k] for k in params)
    x = jax.random.normal(jax.random.key(9), (1, T, 32))
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    seg = jnp.ones((1, T), jnp.int32)
    mask = attention_mask(seg, seg, pos, pos, sliding_window=window)
    y, _ = nnx.jit(lambda a, x, m: a(x, pos, m, None, None))(attn, x, mask)
    p = {(k if part == "weight" else f"{k}_{part}"): np.asarray(v[...], np.float64)
         for k, proj in nnx.state(attn, nnx.Param).items() for part, v in proj.items()}
    inv_freq = np.asarray(rope_inv_freq(16, cfg.rope_theta, scaling), np.float64)
    want = attention_numpy(np.asarray(x[0], np.float64), p, pos_t=np.arange(T, dtype=np.float64),
                           inv_freq=inv_freq, window=window)
    np.testing.assert_allclose(y[0], want, rtol=0, atol=1e-5)


def test_decoder_options_reach_the_layers():
    tokens = jax.random.randint(jax.random.key(0), (2, T), 0, 64)

    def logits(**kw):
        return forward(Decoder(decoder_config(**kw), rngs=nnx.Rngs(params=0)), tokens)

    plain = logits()
    # llama3 scaling with factor 1 changes no frequency; factor 8 does
    np.testing.assert_allclose(logits(rope_scaling="llama3", rope_scaling_factor=1.0,
                                      rope_original_max_position_embeddings=256), plain, rtol=0, atol=1e-6)
    scaled = logits(rope_scaling="llama3", rope_original_max_position_embeddings=256)
    assert np.abs(np.asarray(scaled - plain)).max() > 1e-3

    # sliding window 3 over 2 layers: position t depends on tokens t-4..t only, and cached
    # decoding applies the same window
    model = Decoder(decoder_config(sliding_window=3), rngs=nnx.Rngs(params=0))
    full = forward(model, tokens)
    changed = forward(model, tokens.at[:, 0].set((tokens[:, 0] + 1) % 64))
    assert np.abs(np.asarray(changed[:, 4] - full[:, 4])).max() > 1e-4
    np.testing.assert_array_equal(changed[:, 5:], full[:, 5:])
    _, cache = forward(model, tokens[:, :4], model.init_cache(2, T))
    step_logits = []
    for t in range(4, T):
        out, cache = forward(model, tokens[:, t:t + 1], cache)
        step_logits.append(out[:, 0])
    np.testing.assert_allclose(np.stack(step_logits, 1), full[:, 4:], rtol=0, atol=1e-5)


def test_gelu_tanh_is_gpt2_gelu_new():
    x = np.linspace(-6, 6, 101)
    gelu_new = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    fn, gated = ACTIVATIONS["gelu_tanh"]
    assert not gated
    np.testing.assert_allclose(fn(jnp.asarray(x, jnp.float32)), gelu_new, rtol=0, atol=2e-6)


def test_activation_and_defaults_from_the_config():
    m = compose(base_config()).model
    m.update(d_model=48, n_heads=4)
    llama = DecoderConfig.from_config(m, vocab_size=64, max_seq_len=T)
    assert (llama.mlp_activation, llama.d_ff, llama.qkv_bias, llama.rope_scaling) == ("swiglu", 128, False, "")
    m.update(style="gpt2")
    assert DecoderConfig.from_config(m, vocab_size=64, max_seq_len=T).mlp_activation == "gelu"
    m.update(activation="gelu_tanh")
    gpt2 = DecoderConfig.from_config(m, vocab_size=64, max_seq_len=T)
    assert (gpt2.mlp_activation, gpt2.d_ff) == ("gelu_tanh", 192)
    m.update(activation="tanh")
    with pytest.raises(ValueError, match=re.escape("model.activation='tanh' is not supported by model.decoder: "
                                                   "set --config.model.activation to one of swiglu, geglu, gelu, relu, "
                                                   "gelu_tanh")):
        DecoderConfig.from_config(m, vocab_size=64, max_seq_len=T)
    with pytest.raises(ValueError, match=re.escape("model.rope_scaling='yarn' is not supported by model.decoder")):
        decoder_config(rope_scaling="yarn")
