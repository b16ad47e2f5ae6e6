"""HF safetensors: our decoder -> export_hf -> hf_model_section + load_hf_params gives the same
logits; the exported GPT-2 tensors mean what HF GPT-2 means (a numpy forward over them);
sharded checkpoints; bad files named in one-line errors."""

import json
import math
import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from lmstack.config import ConfigError
from lmstack.configs.base import base_config
from lmstack.interop.hf import export_hf, hf_model_section, load_hf_params, read_safetensors
from lmstack.sharding import make_mesh
from lmstack.trainstate import abstract_state, model_factory

pytestmark = pytest.mark.interop
safetensors_numpy = pytest.importorskip("safetensors.numpy")

VOCAB, T = 64, 16
TINY = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, init_std=0.02)
FAMILIES = {
    "llama": dict(style="llama", n_kv_heads=2, tie_embeddings=False, rope_theta=500000.0, rope_scaling="llama3",
                  rope_original_max_position_embeddings=32),
    "qwen2": dict(style="llama", n_kv_heads=2, qkv_bias=True, tie_embeddings=True, rope_theta=1e6),
    "mistral": dict(style="llama", n_kv_heads=2, sliding_window=5, tie_embeddings=False),
    "gpt2": dict(style="gpt2", use_bias=True, activation="gelu_tanh", tie_embeddings=True),
    "nanogpt": dict(style="gpt2", use_bias=False, tie_embeddings=True),  # exported with zero biases
}


def _mesh_cfg():
    m = base_config().mesh
    m.update(data=2, fsdp=2, tensor=2)
    return m


def build(section):
    """(model constructor, resolved config, graphdef, abstract params) on a data x fsdp x tensor mesh."""
    c = base_config()
    c.model.update(section)
    c.data.seq_len = T
    make, mcfg = model_factory(c, vocab_size=VOCAB)
    graphdef, abstract, _ = abstract_state(make, optax.sgd(0.1), make_mesh(_mesh_cfg()))
    return make, mcfg, graphdef, abstract["params"]


def random_params(abstract, seed=0):
    """Parameters of the abstract tree's shapes, every leaf random (norm scales around 1)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
        return jax.numpy.asarray(x + 1.0 if "scale" in jax.tree_util.keystr(path) else x)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@nnx.jit
def forward(model, tokens):
    return model(tokens)


TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, T))


def exported(tmp_path, family, **export_kw):
    section = TINY | FAMILIES[family]
    _, mcfg, graphdef, abstract = build(section)
    params = random_params(abstract)
    export_hf(params, mcfg, tmp_path, **export_kw)
    return mcfg, np.asarray(forward(nnx.merge(graphdef, params), TOKENS))


def imported_logits(path):
    _, mcfg, graphdef, abstract = build(hf_model_section(path))
    params = load_hf_params(path, abstract)
    for leaf, want in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)):
        assert leaf.sharding == want.sharding and leaf.shape == want.shape
    return mcfg, np.asarray(forward(nnx.merge(graphdef, params), TOKENS))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_import_round_trip_keeps_the_logits(tmp_path, family):
    mcfg, want = exported(tmp_path, family)
    hf = json.loads((tmp_path / "config.json").read_text())
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
    assert hf["architectures"] == [arch.get(family, "GPT2LMHeadModel")]
    names = set(read_safetensors(tmp_path))
    assert ("lm_head.weight" in names) == (not mcfg.tie_embeddings)
    got_cfg, got = imported_logits(tmp_path)
    same = dict(init_std=got_cfg.init_std, use_bias=got_cfg.use_bias)  # gpt2: HF biases are always there
    assert got_cfg == type(mcfg)(**(vars(mcfg) | same))
    diff = np.abs(got - want).max()
    print(f"{family}: max |logit difference| {diff:.2e} (logits up to {np.abs(want).max():.1f})")
    assert diff < 1e-5


def gpt2_numpy(tensors, hf):
    """HF GPT2LMHeadModel forward in float64 over its own tensor names: Conv1D ``x @ W + b``
    with W ``[in, out]``, q/k/v fused in c_attn, gelu_new, tied lm_head."""
    d, n = hf["n_embd"], hf["n_head"]
    h = d // n
    w = {k: v.astype(np.float64) for k, v in tensors.items()}

    def ln(x, p):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + hf["layer_norm_epsilon"]) * w[p + ".weight"] + w[p + ".bias"]

    def gelu_new(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    out = []
    for row in TOKENS:
        t = len(row)
        x = w["transformer.wte.weight"][row] + w["transformer.wpe.weight"][:t]
        for i in range(hf["n_layer"]):
            p = f"transformer.h.{i}."
            qkv = ln(x, p + "ln_1") @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
            q, k, v = (a.reshape(t, n, h).transpose(1, 0, 2) for a in np.split(qkv, 3, axis=-1))
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(h) + np.triu(np.full((t, t), -np.inf), 1)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            a = (probs / probs.sum(-1, keepdims=True)) @ v
            x = x + a.transpose(1, 0, 2).reshape(t, d) @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
            m = gelu_new(ln(x, p + "ln_2") @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
            x = x + m @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
        out.append(ln(x, "transformer.ln_f") @ w["transformer.wte.weight"].T)
    return np.stack(out)


def test_exported_gpt2_tensors_mean_what_hf_gpt2_means(tmp_path):
    _, want = exported(tmp_path, "gpt2")
    hf = json.loads((tmp_path / "config.json").read_text())
    assert (hf["activation_function"], hf["n_inner"], hf["n_positions"]) == ("gelu_new", 64, T)
    tensors = read_safetensors(tmp_path)
    got = gpt2_numpy(tensors, hf)
    diff = np.abs(got - want).max()
    print(f"numpy GPT-2 over the exported tensors: max |logit difference| {diff:.2e}")
    assert diff < 1e-5

    # OpenAI's gpt2 checkpoint names its tensors without "transformer." and keeps the causal-mask buffers
    openai = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    openai |= {f"h.{i}.attn.bias": np.tril(np.ones((1, 1, T, T), np.float32)) for i in range(hf["n_layer"])}
    safetensors_numpy.save_file(openai, tmp_path / "model.safetensors")
    _, loaded = imported_logits(tmp_path)
    assert np.abs(loaded - want).max() < 1e-5


def llama_numpy(tensors, hf):
    """HF LlamaForCausalLM / Qwen2ForCausalLM forward in float64 over its own tensor names:
    Linear ``x @ W.T (+ b)``, RoPE as ``q * cos + rotate_half(q) * sin``, ``repeat_kv`` for GQA."""
    n, kv, h = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    w = {k: v.astype(np.float64) for k, v in tensors.items()}
    inv_freq = 1.0 / hf["rope_theta"] ** (np.arange(0, h, 2) / h)

    def rms(x, p):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + hf["rms_norm_eps"]) * w[p]

    def linear(x, p):
        return x @ w[p + ".weight"].T + w.get(p + ".bias", 0.0)

    def rotate_half(x):
        return np.concatenate([-x[..., h // 2:], x[..., : h // 2]], -1)

    out = []
    for row in TOKENS:
        t = len(row)
        emb = np.concatenate([np.arange(t)[:, None] * inv_freq] * 2, -1)[None]  # (1, t, h)
        cos, sin = np.cos(emb), np.sin(emb)
        x = w["model.embed_tokens.weight"][row]
        for i in range(hf["num_hidden_layers"]):
            p = f"model.layers.{i}."
            a = rms(x, p + "input_layernorm.weight")
            q, k, v = (linear(a, p + f"self_attn.{c}_proj").reshape(t, -1, h).transpose(1, 0, 2) for c in "qkv")
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            k, v = np.repeat(k, n // kv, axis=0), np.repeat(v, n // kv, axis=0)
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(h) + np.triu(np.full((t, t), -np.inf), 1)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            att = ((probs / probs.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(t, n * h)
            x = x + linear(att, p + "self_attn.o_proj")
            m = rms(x, p + "post_attention_layernorm.weight")
            gate = linear(m, p + "mlp.gate_proj")
            x = x + linear(gate / (1 + np.exp(-gate)) * linear(m, p + "mlp.up_proj"), p + "mlp.down_proj")
        head = w["model.embed_tokens.weight"] if hf["tie_word_embeddings"] else w["lm_head.weight"]
        out.append(rms(x, "model.norm.weight") @ head.T)
    return np.stack(out)


def test_exported_qwen2_tensors_mean_what_hf_qwen2_means(tmp_path):
    _, want = exported(tmp_path, "qwen2")
    got = llama_numpy(read_safetensors(tmp_path), json.loads((tmp_path / "config.json").read_text()))
    diff = np.abs(got - want).max()
    print(f"numpy Qwen2 over the exported tensors: max |logit difference| {diff:.2e}")
    assert diff < 1e-5


def test_sharded_checkpoint_and_bfloat16_read_back(tmp_path):
    _, want = exported(tmp_path, "qwen2", dtype="bfloat16")
    single = tmp_path / "model.safetensors"
    from safetensors import safe_open

    with safe_open(single, framework="numpy") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
    assert {str(v.dtype) for v in raw.values()} == {"bfloat16"}
    names = sorted(raw)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        safetensors_numpy.save_file({k: raw[k] for k in part}, tmp_path / file, metadata={"format": "pt"})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: file for file, part in shards.items() for k in part}}))
    single.unlink()
    back = read_safetensors(tmp_path)
    assert sorted(back) == names
    for k in names:
        np.testing.assert_array_equal(back[k], raw[k].astype(np.float32))
    _, got = imported_logits(tmp_path)
    diff = np.abs(got - want).max()
    print(f"qwen2 through bfloat16 shards: max |logit difference| {diff:.2e}")
    assert diff < 0.1 * np.abs(want).max()  # bf16 weights: a rounding of the model, not a different one

    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConfigError, match=re.escape("model-00002-of-00002.safetensors is missing (")):
        read_safetensors(tmp_path)


def rewrite(tmp_path, change):
    tensors = read_safetensors(tmp_path)
    change(tensors)
    safetensors_numpy.save_file(tensors, tmp_path / "model.safetensors")


def test_bad_checkpoints_name_the_tensor(tmp_path):
    exported(tmp_path, "llama")
    _, _, _, abstract = build(hf_model_section(tmp_path))
    good = read_safetensors(tmp_path)

    def load_error(change) -> str:
        rewrite(tmp_path, change)
        with pytest.raises(ConfigError) as e:
            load_hf_params(tmp_path, abstract)
        safetensors_numpy.save_file(good, tmp_path / "model.safetensors")
        return str(e.value)

    name = "model.layers.1.mlp.up_proj.weight"
    assert (f"model.safetensors: tensor {name} has shape [32, 64], expected [64, 32] from "
            in load_error(lambda t: t.__setitem__(name, t[name].T.copy())))
    assert ("tensor model.layers.0.self_attn.k_proj.weight is missing (1 missing in all) for LlamaForCausalLM"
            in load_error(lambda t: t.pop("model.layers.0.self_attn.k_proj.weight")))
    assert ("unexpected tensor model.layers.0.self_attn.o_proj.bias (1 in all: model.layers.0.self_attn.o_proj.bias)"
            in load_error(lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.bias", np.zeros(32, np.float32))))
    # buffers HF checkpoints may carry are not parameters
    rewrite(tmp_path, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", np.ones(4, np.float32)))
    load_hf_params(tmp_path, abstract)


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gemma"), "config.json: model_type='gemma' is not supported: lmstack imports llama, mistral, "
                               "qwen2, gpt2 decoders"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "config.json: rope_scaling.rope_type='yarn' is not "
                                                              "supported: lmstack implements llama3 scaling or none"),
    (dict(architectures=["LlamaForSequenceClassification"]), "config.json: architectures="
                                                             "['LlamaForSequenceClassification'] is not supported"),
    (dict(attention_bias=True), "config.json: attention_bias=True is not supported"),
])
def test_unsupported_configs_name_file_key_and_value(tmp_path, change, message):
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": T}
    (tmp_path / "config.json").write_text(json.dumps(hf | change))
    with pytest.raises(ConfigError, match=re.escape(message)):
        hf_model_section(tmp_path)


def test_smollm2_config_is_a_llama(tmp_path):
    # SmolLM2-135M's config.json (HF hub), trimmed to the keys that matter
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 576,
          "intermediate_size": 1536, "max_position_embeddings": 8192, "num_attention_heads": 9,
          "num_hidden_layers": 30, "num_key_value_heads": 3, "rms_norm_eps": 1e-05, "rope_scaling": None,
          "rope_theta": 100000, "tie_word_embeddings": True, "vocab_size": 49152, "pretraining_tp": 1}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    section = hf_model_section(tmp_path)
    assert {k: section[k] for k in ("style", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                                    "tie_embeddings", "rope_theta", "rope_scaling")} == dict(
        style="llama", d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536,
        tie_embeddings=True, rope_theta=100000.0, rope_scaling="")
    c = base_config()
    c.model.update(section)  # every key is a config key
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: neither model.safetensors nor "
                                                    "model.safetensors.index.json found")):
        read_safetensors(tmp_path)
