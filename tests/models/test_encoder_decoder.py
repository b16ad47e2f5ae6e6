"""Encoder-decoder: shapes, encode/decode, segment isolation in cross- and self-attention,
causality, options, sharding, bf16."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lmstack.config import compose
from lmstack.configs.base import base_config
from lmstack.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from lmstack.sharding import batch_sharding, make_mesh
from lmstack.trainstate import init_state, model_factory

P = jax.sharding.PartitionSpec
VOCAB, S, T = 256, 16, 8


def model_section(**kw):
    c = base_config()
    c.model.name = "encoder_decoder"
    m = compose(c).model
    m.update(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, init_std=0.2)
    m.update(kw)
    return m


def build(dtype="float32", **kw):
    cfg = EncoderDecoderConfig.from_config(model_section(dtype=dtype, **kw), vocab_size=VOCAB, max_seq_len=S)
    return EncoderDecoder(cfg, rngs=nnx.Rngs(params=0))


@nnx.jit
def forward(model, inputs, targets, in_seg, dec_seg):
    return model(inputs, targets, input_segment_ids=in_seg, decoder_segment_ids=dec_seg)


def packed(b=2):
    """Two examples per row: encoder segments of 10 and 6 tokens, decoder segments of 4 and 4."""
    k1, k2 = jax.random.split(jax.random.key(1))
    inputs = jax.random.randint(k1, (b, S), 0, VOCAB)
    targets = jax.random.randint(k2, (b, T), 0, VOCAB)
    in_seg = jnp.array([[1] * 10 + [2] * 6] * b, jnp.int32)
    dec_seg = jnp.array([[1] * 4 + [2] * 4] * b, jnp.int32)
    return inputs, targets, in_seg, dec_seg


def bump(x, i):
    return x.at[:, i].set((x[:, i] + 1) % VOCAB)


@pytest.mark.parametrize("options", [
    dict(positions="relative"),
    dict(positions="rope", share_embeddings=False, tie_embeddings=False, n_kv_heads=2),
], ids=["relative-shared", "rope-separate"])
def test_segments_stay_apart_and_the_decoder_is_causal(options):
    model = build(**options)
    inputs, targets, in_seg, dec_seg = packed()
    logits = forward(model, inputs, targets, in_seg, dec_seg)
    assert logits.shape == (2, T, VOCAB) and logits.dtype == jnp.float32

    # cross-attention: an encoder token of example 1 reaches example 1's targets only
    changed = forward(model, bump(inputs, 3), targets, in_seg, dec_seg)
    assert not np.allclose(changed[:, :4], logits[:, :4], atol=1e-4)
    np.testing.assert_allclose(changed[:, 4:], logits[:, 4:], rtol=0, atol=1e-6)
    # decoder self-attention: causal within the example, blind to the other one
    changed = forward(model, inputs, bump(targets, 1), in_seg, dec_seg)
    assert not np.allclose(changed[:, 1:4], logits[:, 1:4], atol=1e-4)
    np.testing.assert_allclose(changed[:, :1], logits[:, :1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(changed[:, 4:], logits[:, 4:], rtol=0, atol=1e-6)
    # the encoder is bidirectional: a later input token changes an earlier encoder state
    enc = model.encode(inputs, segment_ids=in_seg)
    enc2 = model.encode(bump(inputs, 9), segment_ids=in_seg)
    assert not np.allclose(enc[:, 0], enc2[:, 0], atol=1e-4)
    np.testing.assert_allclose(enc[:, 10:], enc2[:, 10:], rtol=0, atol=1e-6)


def test_encode_then_decode_equals_the_whole_call():
    model = build()
    inputs, targets, in_seg, dec_seg = packed()
    whole = forward(model, inputs, targets, in_seg, dec_seg)
    encoded = model.encode(inputs, segment_ids=in_seg)
    assert encoded.shape == (2, S, 32) and encoded.dtype == jnp.float32
    parts = model.decode(encoded, targets, input_segment_ids=in_seg, decoder_segment_ids=dec_seg)
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-5)


def abstract_params(**kw):
    cfg = EncoderDecoderConfig.from_config(model_section(**kw), vocab_size=VOCAB, max_seq_len=S)
    return nnx.state(nnx.eval_shape(lambda: EncoderDecoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def test_layer_counts_embeddings_and_head_by_config():
    shared = abstract_params(n_encoder_layers=1, n_decoder_layers=3)
    assert shared["encoder"]["blocks"]["attn"]["q"]["weight"].shape[0] == 1
    assert shared["decoder_blocks"]["cross_attn"]["q"]["weight"].shape[0] == 3
    assert "decoder_embed" not in shared and "lm_head" not in shared
    assert shared["encoder"]["relpos"]["table"].shape == (32, 4)  # (relpos_buckets, heads)
    assert shared["decoder_relpos"]["table"].shape == (32, 4)
    assert "lm_head" not in shared["encoder"] and "final_norm" in shared["encoder"]
    separate = abstract_params(share_embeddings=False, tie_embeddings=False, positions="rope")
    assert separate["decoder_embed"].shape == (VOCAB, 32)
    assert separate["lm_head"].shape == (32, VOCAB)
    assert "relpos" not in separate["encoder"] and "decoder_relpos" not in separate


def test_flops_per_token_counts_both_stacks():
    cfg = build().cfg
    d, n, h, f, v, L = 32, 4, 8, 64, VOCAB, 2
    attn, mlp = 4 * d * n * h, 3 * d * f  # swiglu: gate, up, down
    # per example with S encoder and T decoder positions
    enc = 6 * L * (attn + mlp) * S + 12 * L * n * h * S * S
    dec = 6 * (L * (attn + mlp + 2 * d * n * h) * T + L * 2 * d * n * h * S + d * v * T)
    dec += 12 * L * n * h * (T * T + T * S)
    assert cfg.flops_per_token(S, decoder_len=T) == pytest.approx((enc + dec) / (S + T), rel=1e-12)


def test_sharded_forward_matches_one_device_and_params_follow_the_rules():
    cfg = base_config()
    cfg.model = model_section()
    cfg.data.seq_len = S
    make_model, _ = model_factory(cfg, vocab_size=VOCAB)
    inputs, targets, in_seg, dec_seg = packed(b=4)

    def run(model, *xs):
        return model(xs[0], xs[1], input_segment_ids=xs[2], decoder_segment_ids=xs[3])

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state, _ = init_state(make_model, optax.adamw(1e-3), mesh)
    with jax.set_mesh(mesh):
        xs = [jax.device_put(x, batch_sharding(mesh)) for x in (inputs, targets, in_seg, dec_seg)]
        got = jax.jit(lambda p, f, *xs: run(nnx.merge(graphdef, p, f), *xs))(state["params"], state["frozen"], *xs)
    one_device = nnx.merge(graphdef, *jax.device_get((state["params"], state["frozen"])))
    want = nnx.jit(run)(one_device, inputs, targets, in_seg, dec_seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    params = state["params"]
    cross_k = params["decoder_blocks"]["cross_attn"]["k"]["weight"][...]  # (layers, embed, kv_heads, head_dim)
    assert cross_k.sharding.spec == P(None, "fsdp", "tensor", None)
    assert cross_k.addressable_shards[0].data.shape == (2, 16, 2, 8)
    assert params["decoder_relpos"]["table"][...].sharding.spec == P(None, "tensor")
    assert params["encoder"]["embed"][...].sharding.spec == P("tensor", "fsdp")


def test_bfloat16_compute_stays_close_to_float32():
    inputs, targets, in_seg, dec_seg = packed()
    ref = forward(build("float32"), inputs, targets, in_seg, dec_seg)
    low = forward(build("bfloat16"), inputs, targets, in_seg, dec_seg)
    assert low.dtype == jnp.float32  # logits are float32 whatever the compute dtype
    assert np.linalg.norm(np.asarray(low - ref)) / np.linalg.norm(np.asarray(ref)) < 5e-2


@pytest.mark.parametrize("key, value, message", [
    ("positions", "learned", "model.positions='learned' is not supported by model.encoder_decoder: "
                             "set --config.model.positions to one of relative, rope"),
    ("norm", "batchnorm", "model.norm='batchnorm' is not supported by model.encoder_decoder"),
])
def test_bad_options_name_the_key_and_the_choices(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EncoderDecoderConfig.from_config(model_section(**{key: value}), vocab_size=VOCAB, max_seq_len=S)
