"""Encoder: shapes, bidirectionality, segment isolation, pooling, T5 buckets, sharding, bf16."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lmstack import registry
from lmstack.config import compose
from lmstack.configs.base import base_config
from lmstack.models.encoder import Encoder, EncoderConfig, pool
from lmstack.models.layers import relative_position_bucket
from lmstack.sharding import batch_sharding, make_mesh
from lmstack.trainstate import init_state, model_factory

P = jax.sharding.PartitionSpec
VOCAB, T = 256, 16

BERT = dict(style="gpt2", positions="learned", norm_position="post", activation="gelu", type_vocab_size=2,
            pooler=True, mlm_transform=True, use_bias=True, pooling="cls")
MODERN = dict(style="llama", positions="rope", norm_position="pre", activation="swiglu", n_kv_heads=2)
RELATIVE = dict(style="llama", positions="relative", activation="geglu")


def model_section(**kw):
    c = base_config()
    c.model.name = "encoder"
    m = compose(c).model
    m.update(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, init_std=0.2)
    m.update(kw)
    return m


def build(dtype="float32", **kw):
    cfg = EncoderConfig.from_config(model_section(dtype=dtype, **kw), vocab_size=VOCAB, max_seq_len=T)
    return Encoder(cfg, rngs=nnx.Rngs(params=0))


@nnx.jit
def forward(model, tokens, segment_ids):
    return model(tokens, segment_ids=segment_ids)


def tokens_and_segments(b=2):
    tokens = jax.random.randint(jax.random.key(1), (b, T), 0, VOCAB)
    seg = jnp.array([[1] * 6 + [2] * 6 + [0] * 4] * b, jnp.int32)
    return tokens, seg


@pytest.mark.parametrize("options", [BERT, MODERN, RELATIVE], ids=["bert", "modern", "relative"])
def test_shapes_bidirectionality_and_segment_isolation(options):
    model = build(**options)
    tokens, seg = tokens_and_segments()
    h = forward(model, tokens, seg)
    assert h.shape == (2, T, 32) and h.dtype == jnp.float32
    logits = model.lm_logits(h)
    assert logits.shape == (2, T, VOCAB) and logits.dtype == jnp.float32
    assert model.pooled(h, seg).shape == (2, 32)

    # a later token of segment 1 changes an earlier one (bidirectional)...
    h2 = forward(model, tokens.at[:, 5].set((tokens[:, 5] + 1) % VOCAB), seg)
    assert not np.allclose(h2[:, 0], h[:, 0], atol=1e-4)
    # ...and never segment 2, which is also blind to padding
    np.testing.assert_allclose(h2[:, 6:12], h[:, 6:12], rtol=0, atol=1e-6)
    h3 = forward(model, tokens.at[:, 14].set((tokens[:, 14] + 1) % VOCAB), seg)
    np.testing.assert_allclose(h3[:, :12], h[:, :12], rtol=0, atol=1e-6)


def test_bert_options_build_the_bert_parameters():
    model = build(**BERT)
    params = nnx.state(model, nnx.Param)
    for name in ("pos_embed", "type_embed", "embed_norm", "mlm_dense", "mlm_norm", "lm_bias", "pooler_dense"):
        assert name in params, name
    assert model.final_norm is None  # post-LN ends normalised by the last block
    assert "relpos" not in params and "lm_head" not in params
    tokens, seg = tokens_and_segments()
    h0 = model(tokens, segment_ids=seg)
    h1 = model(tokens, segment_ids=seg, token_types=(jnp.arange(T) >= 6).astype(jnp.int32)[None].repeat(2, 0))
    assert not np.allclose(h0[:, 8], h1[:, 8], atol=1e-4)  # token types matter
    pooled = model.pooled(h0, seg)
    assert np.all(np.abs(pooled) <= 1.0)  # the pooler ends in tanh
    modern = nnx.state(build(**MODERN), nnx.Param)
    assert "final_norm" in modern and "gate" in modern["blocks"]["mlp"]
    assert "pos_embed" not in modern and "relpos" in nnx.state(build(**RELATIVE), nnx.Param)


def test_flops_per_token_counts_the_matmul_parameters():
    model = build(**MODERN, tie_embeddings=True)
    cfg = model.cfg
    blocks = nnx.state(model, nnx.Param)["blocks"]
    matmul = sum(blocks["attn"][k]["weight"][...].size for k in "qkvo")
    matmul += sum(blocks["mlp"][k]["weight"][...].size for k in ("gate", "up", "down"))
    head = VOCAB * 32  # tied: the embedding table, used once more as the output
    expected = 6 * (matmul + head) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T
    assert cfg.flops_per_token(T) == expected


def test_remat_and_unrolling_change_nothing_and_dropout_needs_an_rng():
    tokens, seg = tokens_and_segments()

    def loss(model, rng):
        return jnp.mean(model.lm_logits(model(tokens, segment_ids=seg, rng=rng)) ** 2)

    value_and_grad = nnx.jit(nnx.value_and_grad(loss))
    plain, g_plain = value_and_grad(build(**MODERN, dropout=0.1), jax.random.key(0))
    remat, g_remat = value_and_grad(build(**MODERN, dropout=0.1, remat="full", scan_unroll=2), jax.random.key(0))
    np.testing.assert_allclose(remat, plain, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    no_dropout = nnx.jit(loss)(build(**MODERN, dropout=0.1), None)
    assert abs(float(no_dropout) - float(plain)) > 1e-4


def test_pool_kinds_match_numpy():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((3, 7, 5)).astype(np.float32)
    lengths = [7, 4, 1]
    seg = np.array([[1] * n + [0] * (7 - n) for n in lengths], np.int32)
    ref = {
        "mean": np.stack([hidden[i, :n].mean(0) for i, n in enumerate(lengths)]),
        "cls": hidden[:, 0],
        "last": np.stack([hidden[i, n - 1] for i, n in enumerate(lengths)]),
    }
    for kind, want in ref.items():
        np.testing.assert_allclose(pool(jnp.asarray(hidden), jnp.asarray(seg), kind), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pool(jnp.asarray(hidden), None, "last"), hidden[:, -1])
    with pytest.raises(ValueError, match="pooling 'max' is not one of mean, cls, last"):
        pool(jnp.asarray(hidden), jnp.asarray(seg), "max")


def t5_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """T5's published formula (Raffel et al. 2020; mesh_tensorflow ``_relative_position_bucket``),
    written out for one integer ``relative_position = key - query``."""
    bucket, n, rel = 0, num_buckets, relative_position
    if bidirectional:
        n //= 2
        if rel > 0:
            bucket += n
        rel = abs(rel)
    else:
        rel = max(-rel, 0)
    max_exact = n // 2
    if rel < max_exact:
        return bucket + rel
    large = max_exact + int(math.log(rel / max_exact) / math.log(max_distance / max_exact) * (n - max_exact))
    return bucket + min(large, n - 1)


# (relative_position, bidirectional, num_buckets, max_distance) -> bucket, worked by hand
HAND_TABLE = [
    (0, True, 32, 128, 0), (-1, True, 32, 128, 1), (1, True, 32, 128, 17), (-7, True, 32, 128, 7),
    (-8, True, 32, 128, 8),  # first log bucket: 8 + floor(log(1)/log(16) * 8)
    (-20, True, 32, 128, 10),  # 8 + floor(log(2.5)/log(16) * 8) = 8 + floor(2.64)
    (20, True, 32, 128, 26), (-127, True, 32, 128, 15), (-128, True, 32, 128, 15), (1000, True, 32, 128, 31),
    (5, False, 32, 128, 0),  # causal: keys after the query share bucket 0
    (-5, False, 32, 128, 5), (-16, False, 32, 128, 16),
    (-100, False, 32, 128, 30),  # 16 + floor(log(6.25)/log(8) * 16) = 16 + floor(14.1)
    (-128, False, 32, 128, 31), (-3, True, 8, 20, 2), (-4, True, 8, 20, 2), (-7, True, 8, 20, 3), (3, True, 8, 20, 6),
]


def test_relative_position_bucket_matches_t5():
    for rel, bidir, nb, md, want in HAND_TABLE:
        assert t5_bucket(rel, bidir, nb, md) == want, (rel, bidir, nb, md)
        got = relative_position_bucket(jnp.array(rel), bidirectional=bidir, num_buckets=nb, max_distance=md)
        assert int(got) == want, (rel, bidir, nb, md)
    rels = np.arange(-300, 301)
    for bidir in (True, False):
        for nb, md in ((32, 128), (16, 64), (8, 20), (64, 256)):
            got = relative_position_bucket(jnp.asarray(rels), bidirectional=bidir, num_buckets=nb, max_distance=md)
            want = [t5_bucket(int(r), bidir, nb, md) for r in rels]
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{bidir=} {nb=} {md=}")


def test_sharded_forward_matches_one_device_and_params_follow_the_rules():
    cfg = base_config()
    cfg.model = model_section(**RELATIVE, n_heads=4, type_vocab_size=2, mlm_transform=True, pooler=True)
    cfg.data.seq_len = T
    make_model, _ = model_factory(cfg, vocab_size=VOCAB)
    assert registry.lookup("model", "encoder") is Encoder
    tokens, seg = tokens_and_segments(b=4)

    def run(model, tokens, seg):
        h = model(tokens, segment_ids=seg)
        return model.lm_logits(h), model.pooled(h, seg)

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state, _ = init_state(make_model, optax.adamw(1e-3), mesh)
    with jax.set_mesh(mesh):
        bs = batch_sharding(mesh)
        got = jax.jit(lambda p, f, t, s: run(nnx.merge(graphdef, p, f), t, s))(
            state["params"], state["frozen"], jax.device_put(tokens, bs), jax.device_put(seg, bs))
    one_device = nnx.merge(graphdef, *jax.device_get((state["params"], state["frozen"])))
    want = nnx.jit(run)(one_device, tokens, seg)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    params = state["params"]
    q = params["blocks"]["attn"]["q"]["weight"][...]  # (layers, embed, heads, head_dim)
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 16, 2, 8)
    assert params["relpos"]["table"][...].sharding.spec == P(None, "tensor")  # (relpos_buckets, heads)
    assert params["type_embed"][...].sharding.spec == P(None, "fsdp")  # (token_types, embed)
    assert params["embed"][...].sharding.spec == P("tensor", "fsdp")


@pytest.mark.parametrize("options", [BERT, MODERN], ids=["bert", "modern"])
def test_bfloat16_compute_stays_close_to_float32(options):
    tokens, seg = tokens_and_segments()
    ref = build("float32", **options)
    low = build("bfloat16", **options)
    h32, h16 = forward(ref, tokens, seg), forward(low, tokens, seg)
    assert h16.dtype == jnp.bfloat16
    logits16 = low.lm_logits(h16)
    assert logits16.dtype == jnp.float32
    for a, b in ((h16, h32), (logits16, ref.lm_logits(h32))):
        a, b = np.asarray(a, np.float32), np.asarray(b)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 5e-2


@pytest.mark.parametrize("key, value, message", [
    ("positions", "alibi", "model.positions='alibi' is not supported by model.encoder: set --config.model.positions "
                           "to one of learned, rope, relative"),
    ("norm_position", "sandwich", "model.norm_position='sandwich' is not supported by model.encoder"),
    ("activation", "tanh", "model.activation='tanh' is not supported by model.encoder: "
                           "set --config.model.activation to one of swiglu, geglu, gelu, relu"),
    ("pooling", "max", "model.pooling='max' is not supported by model.encoder"),
])
def test_bad_options_name_the_key_and_the_choices(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EncoderConfig.from_config(model_section(**{key: value}), vocab_size=VOCAB, max_seq_len=T)
