"""LoRA on the projection module: PEFT's initialisation, scaling, targets, merge/unmerge,
the trainable set and its optimizer state."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lmstack.config import ConfigError
from lmstack.configs.base import base_config
from lmstack.models.projection import Projection
from lmstack.optim import make_optimizer
from lmstack.peft.base import trainable_filter
from lmstack.peft.lora import LoraSpec, apply_lora, lora_parameter_count, merge_lora, projections, unmerge_lora
from lmstack.sharding import batch_sharding, make_mesh
from lmstack.step import compile_train_step
from lmstack.trainstate import init_state, model_factory, peft_method

VOCAB = 64


def tiny_cfg(**peft):
    c = base_config()
    c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    c.data.seq_len = 8
    if peft:
        c.peft.name = "lora"
        c.peft.update(peft)
    return c


def build(**peft):
    from lmstack.config import compose

    c = compose(tiny_cfg(**peft))
    make, _ = model_factory(c, vocab_size=VOCAB)
    return make(), c


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 8)), jnp.int32)


def test_adapted_model_equals_the_base_at_step_zero_and_a_is_peft_uniform():
    base, _ = build()
    adapted, _ = build(r=4, target_modules="q,v,down")
    np.testing.assert_array_equal(adapted(TOKENS), base(TOKENS))  # B = 0: exactly the base model
    paths = [p for p, m in projections(adapted) if m.lora_a is not None]
    assert paths == ["blocks.attn.q", "blocks.attn.v", "blocks.mlp.down"]
    q = adapted.blocks.attn.q
    assert q.lora_a.shape == (2, 32, 4) and q.lora_b.shape == (2, 4, 4, 8)  # (layers, in, r), (layers, r, n, h)
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    a = np.asarray(q.lora_a[...])
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert not np.asarray(q.lora_b[...]).any()
    down = adapted.blocks.mlp.down
    assert np.abs(np.asarray(down.lora_a[...])).max() <= 1 / math.sqrt(64)


class _Out(nnx.Module):
    def __init__(self):
        self.o = Projection((4, 8), (32,), ("heads", "head_dim", "embed"), std=0.02, rngs=nnx.Rngs(params=0))


@pytest.mark.parametrize("rslora", [False, True])
def test_projection_output_is_the_lora_formula(rslora):
    m = _Out()
    apply_lora(m, LoraSpec(4, 8.0, 0.0, "o", rslora), jax.random.key(0))
    rng = np.random.default_rng(1)
    m.o.lora_b[...] = jnp.asarray(rng.normal(size=m.o.lora_b.shape), jnp.float32)
    x = rng.normal(size=(3, 4, 8)).astype(np.float32)  # (tokens, heads, head_dim) into o
    w, a, b = (np.asarray(v[...], np.float64) for v in (m.o.weight, m.o.lora_a, m.o.lora_b))
    scaling = 8.0 / (math.sqrt(4) if rslora else 4)
    want = x.reshape(3, 32) @ w.reshape(32, 32) + scaling * (x.reshape(3, 32) @ a.reshape(32, 4)) @ b
    np.testing.assert_allclose(np.asarray(m.o(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_merge_equals_the_adapter_and_unmerge_restores_the_weights():
    model, _ = build(r=4, target_modules="all-linear")
    rng = np.random.default_rng(2)
    for _, p in projections(model):
        p.lora_b[...] = jnp.asarray(rng.normal(scale=0.1, size=p.lora_b.shape), jnp.float32)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    with_adapter = np.asarray(model(TOKENS))
    assert merge_lora(model) == 7  # q, k, v, o, gate, up, down
    assert np.abs(np.asarray(model(TOKENS)) - with_adapter).max() < 1e-5
    assert unmerge_lora(model) == 7
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        assert np.abs(x - y).max() <= 1e-6
    np.testing.assert_allclose(np.asarray(model(TOKENS)), with_adapter, atol=1e-6)


def test_parameter_count_is_r_times_fan_in_plus_fan_out_per_layer():
    model, _ = build(r=4, target_modules="q,v,up")
    per_layer = 4 * ((32 + 32) + (32 + 16) + (32 + 64))  # q: 32->4x8, v: 32->2x8, up: 32->64
    assert lora_parameter_count(model) == 2 * per_layer


def test_default_targets_train_under_one_percent_of_smollm2_135m():
    from lmstack.config import compose

    c = tiny_cfg(r=8)
    c.model.update(d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536, tie_embeddings=True)
    c = compose(c)
    make, _ = model_factory(c, vocab_size=49152)
    shapes = nnx.eval_shape(make)
    total = sum(x.size for x in jax.tree.leaves(nnx.state(shapes, nnx.Param)))
    lora = sum(x.size for x in jax.tree.leaves(nnx.state(shapes, nnx.LoRAParam)))
    assert lora == 30 * 8 * ((576 + 576) + (576 + 192))
    assert 134_000_000 < total - lora < 135_000_000  # SmolLM2-135M: 134.5M
    assert lora / total < 0.01


def test_bad_targets_and_ranks_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"^peft.target_modules='q_proj' matches no projection of Decoder: its "
                                          r"projections are blocks.attn.k, blocks.attn.o, blocks.attn.q, "
                                          r"blocks.attn.v, blocks.mlp.down, blocks.mlp.gate, blocks.mlp.up: give"):
        build(target_modules="q_proj")
    with pytest.raises(ConfigError, match=r"^peft.r=20 is larger than projection blocks.attn.v \(in 32, out 16\): "
                                          r"a rank above min\(in, out\) = 16 adds nothing; lower --config.peft.r$"):
        build(r=20, target_modules="v")
    model, _ = build()
    with pytest.raises(ConfigError, match=r"is not a regular expression"):
        apply_lora(model, LoraSpec(4, 8.0, 0.0, "blocks.(attn", False), jax.random.key(0))


def _train_steps(cfg, n=3, frozen_layers=0):
    from lmstack.config import compose

    cfg = compose(cfg)
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    make, _ = model_factory(cfg, vocab_size=VOCAB)
    cfg.optimizer.update(lr=1e-2, warmup_steps=0, schedule="constant")
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    trainable = trainable_filter(cfg.train, peft_method(cfg.peft))
    graphdef, state, shardings = init_state(make, tx, mesh, trainable)
    before = jax.device_get(state)
    step = compile_train_step(graphdef, tx, schedule, _LM(), 1, shardings, batch_sharding(mesh),
                              frozen_layers=frozen_layers)
    batch = {"tokens": jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, (2, 9)), jnp.int32)}
    with jax.set_mesh(mesh):
        for i in range(n):
            state, metrics = step(state, batch, jax.random.key(i))
    return before, jax.device_get(state), float(metrics["loss"])


class _LM:
    def loss_fn(self, model, batch, rng):
        t = batch["tokens"]
        logits = model(t[:, :-1], rng=rng)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:])
        return ce.sum(), {"weight": jnp.asarray(ce.size, jnp.float32)}


def _paths(tree):
    return sorted(".".join(map(str, p)) for p, _ in nnx.to_flat_state(tree))


def test_lora_trains_only_the_adapters_and_keeps_no_optimizer_state_for_the_base():
    c = tiny_cfg(r=4, target_modules="q,v", dropout=0.1)
    before, after, _ = _train_steps(c)
    assert _paths(after["params"]) == ["blocks.attn.q.lora_a", "blocks.attn.q.lora_b", "blocks.attn.v.lora_a",
                                       "blocks.attn.v.lora_b"]
    moments = [x for x in jax.tree.leaves(after["opt_state"]) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(after["params"]))
    for x, y in zip(jax.tree.leaves(before["frozen"]), jax.tree.leaves(after["frozen"])):
        np.testing.assert_array_equal(x, y)  # the base never moves
    b = after["params"]["blocks"]["attn"]["q"]["lora_b"][...]
    assert np.abs(b).max() > 0  # B left zero: the adapter learned


def test_train_trainable_and_frozen_choose_parameters_by_path():
    c = tiny_cfg()
    c.train.trainable = r"blocks\..*"
    c.train.frozen = r"blocks\.mlp\..*"
    before, after, _ = _train_steps(c, n=1)
    assert _paths(after["params"]) == ["blocks.attn.k.weight", "blocks.attn.o.weight", "blocks.attn.q.weight",
                                       "blocks.attn.v.weight", "blocks.attn_norm.scale", "blocks.mlp_norm.scale"]
    np.testing.assert_array_equal(before["frozen"]["embed"][...], after["frozen"]["embed"][...])
    c.train.trainable, c.train.frozen = "", "embed|final_norm.scale"
    _, after, _ = _train_steps(c, n=1)
    assert "embed" not in _paths(after["params"]) and "blocks.mlp.up.weight" in _paths(after["params"])


def test_frozen_layers_keep_the_first_blocks_exactly():
    before, after, _ = _train_steps(tiny_cfg(), n=2, frozen_layers=1)
    for path in (("attn", "q", "weight"), ("mlp", "down", "weight"), ("attn_norm", "scale")):
        old, new = (np.asarray(t["params"]["blocks"][path[0]][path[1]][...]) if len(path) == 2 else
                    np.asarray(t["params"]["blocks"][path[0]][path[1]][path[2]][...]) for t in (before, after))
        np.testing.assert_array_equal(new[0], old[0])  # layer 0: frozen, weight decay included
        assert np.abs(new[1] - old[1]).max() > 0
    assert np.abs(after["params"]["embed"][...] - before["params"]["embed"][...]).max() > 0


def test_a_peft_adapter_round_trips_and_one_for_another_base_is_refused(tmp_path):
    from lmstack.config import compose
    from lmstack.interop.peft_export import export_peft, load_peft_adapter
    from lmstack.trainstate import model_factory

    model, c = build(r=4, target_modules="q,v")
    rng = np.random.default_rng(5)
    for _, p in projections(model):
        if p.lora_b is not None:
            p.lora_b[...] = jnp.asarray(rng.normal(size=p.lora_b.shape), jnp.float32)
    _, mcfg = model_factory(c, vocab_size=VOCAB)
    out = export_peft(model, mcfg, LoraSpec.from_section(c.peft), tmp_path / "adapter")
    same, _ = build(r=4, target_modules="q,v")
    assert load_peft_adapter(same, mcfg, out) == 2 * 2 * 2  # q and v, A and B, 2 layers
    np.testing.assert_array_equal(np.asarray(same(TOKENS)), np.asarray(model(TOKENS)))
    wider = tiny_cfg(r=4, target_modules="q,v")
    wider.model.d_model = 48
    wider = compose(wider)
    make, wcfg = model_factory(wider, vocab_size=VOCAB)
    with pytest.raises(ConfigError, match=r"adapter/?: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight "
                                          r"has shape \[4, 32\] but the model needs \[4, 48\]: the adapter's base "
                                          r"model or rank does not match$"):
        load_peft_adapter(make(), wcfg, out)
