"""Two towers: shapes, shared vs separate encoders, pooling, padding, sharding, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lmstack.config import compose
from lmstack.configs.base import base_config
from lmstack.models.encoder import pool
from lmstack.models.two_tower import TwoTower, TwoTowerConfig
from lmstack.sharding import batch_sharding, make_mesh
from lmstack.trainstate import init_state, model_factory

P = jax.sharding.PartitionSpec
VOCAB, T = 256, 12


def model_section(**kw):
    c = base_config()
    c.model.name = "two_tower"
    m = compose(c).model
    m.update(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, init_std=0.2,
             projection_dim=16)
    m.update(kw)
    return m


def build(dtype="float32", **kw):
    cfg = TwoTowerConfig.from_config(model_section(dtype=dtype, **kw), vocab_size=VOCAB, max_seq_len=T)
    return TwoTower(cfg, rngs=nnx.Rngs(params=0))


@nnx.jit
def forward(model, a, b, a_seg, b_seg):
    return model(a, b, a_segment_ids=a_seg, b_segment_ids=b_seg)


def batch(b=2):
    """Right-padded rows of lengths 12 and 7 (padding: segment 0)."""
    k1, k2 = jax.random.split(jax.random.key(1))
    seg = jnp.array([[1] * 12, [1] * 7 + [0] * 5] * (b // 2), jnp.int32)
    a = jax.random.randint(k1, (b, T), 1, VOCAB) * seg
    b_tokens = jax.random.randint(k2, (b, T), 1, VOCAB) * seg
    return a, b_tokens, seg


def n_params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_shared_and_separate_towers():
    a, _, seg = batch()
    shared, separate = build(share_towers=True), build(share_towers=False)
    emb_a, emb_b = forward(shared, a, a, seg, seg)
    assert emb_a.shape == emb_b.shape == (2, 16) and emb_a.dtype == jnp.float32
    # shared: one encoder, so the same input pools to the same vector in both towers...
    np.testing.assert_array_equal(shared.pooled(a, seg, tower="a"), shared.pooled(a, seg, tower="b"))
    # ...and only the projection heads tell the towers apart
    assert not np.allclose(emb_a, emb_b, atol=1e-4)
    pa, pb = separate.pooled(a, seg, tower="a"), separate.pooled(a, seg, tower="b")
    assert not np.allclose(pa, pb, atol=1e-4)
    encoder = sum(x.size for x in jax.tree.leaves(nnx.state(shared.encoder, nnx.Param)))
    assert n_params(separate) - n_params(shared) == encoder
    heads = 2 * 32 * 16 + 2  # two projections and the loss's scale and bias
    assert n_params(shared) == encoder + heads
    assert "lm_head" not in nnx.state(shared.encoder, nnx.Param)  # towers carry no MLM head
    with pytest.raises(ValueError, match="tower 'c' is not one of a, b"):
        shared.embed(a, seg, tower="c")


@pytest.mark.parametrize("kind", ["mean", "cls", "last"])
def test_embeddings_pool_as_configured_and_ignore_padding(kind):
    model = build(pooling=kind, positions="rope")
    a, _, seg = batch()
    hidden = model.encoder(a, segment_ids=seg)
    np.testing.assert_allclose(model.pooled(a, seg), pool(hidden, seg, kind), rtol=1e-6, atol=1e-6)
    embed = nnx.jit(lambda m, t, s: m.embed(t, s, tower="b"))
    want = np.asarray(pool(hidden, seg, kind)) @ np.asarray(model.projection_b.weight[...])
    np.testing.assert_allclose(embed(model, a, seg), want, rtol=1e-5, atol=1e-5)
    # the 7-token row embeds the same on its own, without padding
    alone = embed(model, a[1:, :7], seg[1:, :7])
    np.testing.assert_allclose(alone, embed(model, a, seg)[1:], rtol=1e-5, atol=1e-5)


def test_sharded_forward_matches_one_device_and_params_follow_the_rules():
    cfg = base_config()
    cfg.model = model_section(share_towers=False, positions="relative")
    cfg.data.seq_len = T
    make_model, _ = model_factory(cfg, vocab_size=VOCAB)
    a, b, seg = batch(b=4)

    def run(model, a, b, seg):
        return model(a, b, a_segment_ids=seg, b_segment_ids=seg)

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state, _ = init_state(make_model, optax.adamw(1e-3), mesh)
    with jax.set_mesh(mesh):
        xs = [jax.device_put(x, batch_sharding(mesh)) for x in (a, b, seg)]
        got = jax.jit(lambda p, f, *xs: run(nnx.merge(graphdef, p, f), *xs))(state["params"], state["frozen"], *xs)
    one_device = nnx.merge(graphdef, *jax.device_get((state["params"], state["frozen"])))
    want = nnx.jit(run)(one_device, a, b, seg)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    params = state["params"]
    up = params["encoder_b"]["blocks"]["mlp"]["up"]["weight"][...]  # (layers, embed, mlp)
    assert up.sharding.spec == P(None, "fsdp", "tensor")
    assert up.addressable_shards[0].data.shape == (2, 16, 32)
    proj = params["projection_a"]["weight"][...]  # (embed, projection)
    assert proj.sharding.spec == P("fsdp", None) and proj.addressable_shards[0].data.shape == (16, 16)
    assert params["logit_scale"][...].sharding.spec == P()
    np.testing.assert_allclose(float(params["logit_scale"][...]), np.log(1 / 0.07), rtol=1e-6)


def test_bfloat16_compute_stays_close_to_float32():
    a, b, seg = batch()
    ref = forward(build("float32"), a, b, seg, seg)
    low = forward(build("bfloat16"), a, b, seg, seg)
    for x, y in zip(low, ref):
        assert x.dtype == jnp.float32
        assert np.linalg.norm(np.asarray(x - y)) / np.linalg.norm(np.asarray(y)) < 5e-2


def test_bad_options_name_the_two_tower_model():
    with pytest.raises(ValueError, match=r"model.pooling='max' is not supported by model.two_tower: "
                                         r"set --config.model.pooling to one of mean, cls, last"):
        TwoTowerConfig.from_config(model_section(pooling="max"), vocab_size=VOCAB, max_seq_len=T)
