"""model.attention_impl: jax.nn.dot_product_attention (XLA) and the cuDNN call's arguments give
the einsum path's logits and gradients with packed documents, a prefix LM, a sliding window,
T5's relative bias with cross-attention, and cached decoding with left padding; cuDNN is
refused where it cannot run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack.config import ConfigError, compose, validate
from lmstack.models import attention_core
from lmstack.models.decoder import Decoder, DecoderConfig
from lmstack.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from lmstack.models.layers import Attention, attention_mask
from tests.helpers import packed_batch, tiny_config

VOCAB, B, T = 64, 2, 12
TOL = dict(rtol=1e-5, atol=1e-5)  # float32: the paths differ only in the order of float32 operations


@pytest.fixture
def cudnn_args_via_xla(monkeypatch):
    """attention_impl='cudnn' with the arguments it hands cuDNN (is_causal, the window, the
    mask, the bias in the inputs' dtype) run by XLA's implementation, as no GPU is here."""
    monkeypatch.setitem(attention_core.JAX_IMPLEMENTATION, "cudnn", "xla")


def switch_attention(model, impl):
    """``model`` with every attention running ``impl``: the configs refuse cuDNN in float32,
    so a float32 model reaches the cuDNN branch by switching it after building."""
    for _, m in nnx.iter_graph(model):
        if isinstance(m, Attention):
            m.attention_impl = impl
    return model


def decoder(impl, **cfg):
    c = DecoderConfig(style="llama", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      d_ff=64, max_seq_len=32, init_std=0.2, **cfg)
    return switch_attention(Decoder(c, rngs=nnx.Rngs(0)), impl)


@jax.jit(static_argnums=0)
def loss_and_grads(graphdef, params, tokens, kwargs):
    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1], **kwargs)
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)), logits

    return jax.value_and_grad(loss, has_aux=True)(params)


def case(name):
    """(decoder options, call arguments, tokens): ``causal_window`` is one document per row
    (no mask: causal and the window only); ``packed_window`` packed documents in a window
    (a causal mask); ``packed_prefix_lm`` a prefix LM over packed documents (not causal)."""
    batch = packed_batch(np.random.default_rng(0), B, T, VOCAB)
    tokens = jnp.asarray(batch["tokens"])
    packed = dict(segment_ids=jnp.asarray(batch["segment_ids"][:, :-1]),
                  positions=jnp.asarray(batch["positions"][:, :-1]))
    return {
        "causal_window": (dict(sliding_window=4), {}),
        "packed_window": (dict(sliding_window=4), packed),
        "packed_prefix_lm": ({}, dict(packed, prefix_mask=packed["positions"] < 3)),
    }[name] + (tokens,)


@functools.cache
def einsum_reference(name):
    cfg, kwargs, tokens = case(name)
    return loss_and_grads(*nnx.split(decoder("xla_einsum", **cfg)), tokens, kwargs)


# (case, attention_impl): the cuDNN call differs from XLA's where causal attention goes in as
# is_causal / local_window_size; without is_causal (a prefix LM) it is the dot_product call
@pytest.mark.parametrize("name, impl", [("packed_window", "dot_product"), ("packed_window", "cudnn"),
                                        ("packed_prefix_lm", "dot_product"), ("causal_window", "cudnn")])
def test_decoder_logits_and_gradients_equal_the_einsum_path(name, impl, cudnn_args_via_xla):
    cfg, kwargs, tokens = case(name)
    (ref_loss, ref_logits), ref_grads = einsum_reference(name)
    (loss, logits), grads = loss_and_grads(*nnx.split(decoder(impl, **cfg)), tokens, kwargs)
    np.testing.assert_allclose(logits, ref_logits, **TOL)
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, g_ref, **TOL, err_msg=jax.tree_util.keystr(path))


def test_one_document_without_a_mask_is_the_causal_mask():
    """The mask-free causal path (segment_ids None) equals an explicit single segment."""
    _, _, tokens = case("causal_window")
    model = decoder("xla_einsum", sliding_window=4)
    ones = jnp.ones((B, T), jnp.int32)
    forward = nnx.jit(lambda m, t, seg: m(t, segment_ids=seg))
    np.testing.assert_array_equal(forward(model, tokens[:, :-1], None), forward(model, tokens[:, :-1], ones))


@jax.jit(static_argnums=(0, 4))
def decode_logits(graphdef, params, prompts, left_pad, steps=3):
    """Left-padded prefill, then ``steps`` greedy single-token steps with the cache: the
    logits of every step, (steps + 1, b, vocab)."""
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(prompts.shape[0], prompts.shape[1] + steps, left_pad=left_pad)
    logits, cache = model(prompts, cache=cache)
    out = [logits[:, -1]]
    for _ in range(steps):
        logits, cache = model(jnp.argmax(out[-1], -1)[:, None].astype(jnp.int32), cache=cache)
        out.append(logits[:, -1])
    return jnp.stack(out)


def test_cached_generation_with_left_padding_equals_the_einsum_path(cudnn_args_via_xla):
    """Prefill and decode steps with a KV cache, past a sliding window of 4 (the cuDNN
    setting runs them through XLA's dot_product_attention)."""
    window = 4
    prompts = jnp.asarray([[0, 0, 0, 5, 9, 14, 2], [3, 17, 60, 11, 12, 13, 50]], jnp.int32)
    left_pad = jnp.asarray([3, 0], jnp.int32)
    ref = decode_logits(*nnx.split(decoder("xla_einsum", sliding_window=window)), prompts, left_pad)
    for impl in ("dot_product", "cudnn"):
        got = decode_logits(*nnx.split(decoder(impl, sliding_window=window)), prompts, left_pad)
        np.testing.assert_allclose(got, ref, **TOL, err_msg=impl)


def t5(impl):
    c = EncoderDecoderConfig(vocab_size=VOCAB, d_model=32, n_encoder_layers=1, n_decoder_layers=1, n_heads=4,
                             n_kv_heads=4, head_dim=8, d_ff=64, max_seq_len=32, positions="relative", norm="rmsnorm",
                             activation="relu", relpos_buckets=8, relpos_max_distance=16, init_std=0.2)
    return switch_attention(EncoderDecoder(c, rngs=nnx.Rngs(0)), impl)


def test_encoder_decoder_with_relative_bias_equals_the_einsum_path():
    """T5: bidirectional packed encoder, causal packed decoder, cross-attention, and the
    relative position bias (differentiated) through jax.nn.dot_product_attention's bias."""
    rng = np.random.default_rng(1)
    enc, dec = packed_batch(rng, B, T, VOCAB), packed_batch(rng, B, T, VOCAB)

    @jax.jit(static_argnums=0)
    def loss_and_grads(graphdef, params):
        def loss(p):
            logits = nnx.merge(graphdef, p)(
                jnp.asarray(enc["tokens"]), jnp.asarray(dec["tokens"][:, :-1]),
                input_segment_ids=jnp.asarray(enc["segment_ids"]), input_positions=jnp.asarray(enc["positions"]),
                decoder_segment_ids=jnp.asarray(dec["segment_ids"][:, :-1]),
                decoder_positions=jnp.asarray(dec["positions"][:, :-1]))
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits

        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, ref_logits), ref_grads = loss_and_grads(*nnx.split(t5("xla_einsum")))
    (_, logits), grads = loss_and_grads(*nnx.split(t5("dot_product")))
    np.testing.assert_allclose(logits, ref_logits, **TOL)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, **TOL)


def test_attention_core_agrees_on_its_own_with_grouped_heads(cudnn_args_via_xla):
    """The core alone, bfloat16 inputs (cuDNN's dtype), 8 query heads over 2 KV heads, packed
    causal mask: the three paths agree to bfloat16 rounding of the probabilities (2^-8)."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 16, 8, 16)).astype(jnp.bfloat16)
    k, v = (jax.random.normal(kk, (2, 16, 2, 16)).astype(jnp.bfloat16) for kk in keys[1:])
    seg = jnp.asarray(np.repeat([[1] * 7 + [2] * 9], 2, 0))
    row = jnp.broadcast_to(jnp.arange(16), (2, 16))
    mask = attention_mask(seg, seg, row, row)
    ref = attention_core.attention_core(q, k, v, mask, impl="xla_einsum", causal=True).astype(jnp.float32)
    for impl in ("dot_product", "cudnn"):
        got = attention_core.attention_core(q, k, v, mask, impl=impl, causal=True)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(jnp.float32), ref, rtol=0, atol=2e-2, err_msg=impl)


def test_cudnn_is_refused_off_gpu_when_the_run_is_assembled():
    from lmstack.aot import build_run

    c = tiny_config()
    c.model.dtype = "bfloat16"
    c.model.attention_impl = "cudnn"
    c.data.tokenizer.kind = "byte"
    c.model.vocab_size = 0
    with pytest.raises(ConfigError) as e:
        build_run(c, jax.devices()[:1])
    assert str(e.value) == ("model.attention_impl='cudnn' needs a GPU (cuDNN flash attention), but this run's devices "
                            "are cpu: use --config.model.attention_impl=dot_product (the same attention through XLA)")


@pytest.mark.parametrize("overrides, expected", [
    (dict(attention_impl="flash"), "model.attention_impl is 'flash': must be one of xla_einsum, dot_product, cudnn"),
    (dict(attention_impl="cudnn"), "model.attention_impl='cudnn' needs model.dtype='bfloat16' (cuDNN flash attention "
                                   "runs in bf16/fp16 only), got 'float32': set --config.model.dtype=bfloat16 or use "
                                   "model.attention_impl=dot_product"),
    (dict(attention_impl="cudnn", dtype="bfloat16", n_heads=16),
     "model.attention_impl='cudnn' needs a head width that is a multiple of 8 and at most 256 (128 before Hopper), "
     "got head_dim=4: use model.attention_impl=dot_product"),
])
def test_config_refuses_what_cudnn_cannot_run(overrides, expected):
    c = compose(tiny_config())
    with c.unlocked():
        c.model.update(overrides)
    with pytest.raises(ConfigError, match="invalid config") as e:
        validate(c)
    assert expected in str(e.value)
