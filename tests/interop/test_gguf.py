"""GGUF export and import on a tiny llama decoder: round trips, metadata llama.cpp needs,
quantisation error bounds, the tokenizer metadata, and every bad-input message."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lmstack.config import ConfigError
from lmstack.data.sources import DataError
from lmstack.sharding import make_mesh
from lmstack.trainstate import abstract_state, init_state, model_factory
from tests.helpers import bytes_to_unicode, tiny_config

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
from lmstack.interop.gguf import (  # noqa: E402
    LLAMA_TENSORS,
    build_gguf_tokenizer,
    export_gguf,
    gguf_model_section,
    gguf_tokenizer_parts,
    load_gguf_params,
)

pytestmark = pytest.mark.interop
TENSOR_MAP = {m.ours: m for m in LLAMA_TENSORS}

MESH = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])  # parameters really sharded


def factory(tie: bool, **model):
    c = tiny_config("llama")
    c.model.tie_embeddings = tie
    c.model.init_std = 0.2
    c.model.update(model)
    return model_factory(c, vocab_size=c.model.vocab_size)


def abstract_params(tie: bool = False, **model):
    return abstract_state(factory(tie, **model)[0], optax.identity(), MESH)[1]["params"]


def build(tie: bool = False, **model):
    """A tiny llama decoder (2 layers, d=64, 8 heads over 4 KV heads) with weights of order one
    and random norm scales (and biases), so that a swapped or mis-permuted tensor shows in the logits."""
    make, mcfg = factory(tie, **model)
    graphdef, state, _ = init_state(make, optax.identity(), MESH)
    params = state["params"]
    rng = np.random.default_rng(0)
    for key, var in nnx.to_flat_state(params):
        x = var.get_value()
        if key[-1] == "scale":
            var.set_value(jax.device_put(1 + 0.3 * rng.standard_normal(x.shape, np.float32), x.sharding))
        elif key[-1].endswith("_bias"):  # created as zeros
            var.set_value(jax.device_put(0.2 * rng.standard_normal(x.shape, np.float32), x.sharding))
    return graphdef, params, state["frozen"], mcfg, abstract_params(tie, **model)


@nnx.jit
def forward(model, tokens):
    return model(tokens)


def logits(graphdef, params, frozen, tokens):
    return np.asarray(forward(nnx.merge(graphdef, params, frozen), tokens))


TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 256, size=(2, 16)), jnp.int32)


@pytest.fixture(scope="module")
def untied():
    return build(tie=False)


@pytest.fixture(scope="module")
def untied_f32(untied, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    export_gguf(untied[1], untied[3], path, qtype="F32")
    return path


def test_f32_round_trip_is_exact_and_sharded(untied, untied_f32):
    graphdef, params, frozen, mcfg, abstract = untied
    path = untied_f32
    loaded = load_gguf_params(path, abstract)
    for (key, want), (_, got) in zip(nnx.to_flat_state(params), nnx.to_flat_state(loaded)):
        assert got.get_value().sharding == want.get_value().sharding, key
        np.testing.assert_array_equal(np.asarray(got.get_value()), np.asarray(want.get_value()), err_msg=str(key))
    ref = logits(graphdef, params, frozen, TOKENS)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(logits(graphdef, loaded, frozen, TOKENS), ref, atol=1e-5, rtol=0)


def test_export_writes_the_metadata_llama_cpp_requires(untied, tmp_path):
    _, params, _, mcfg, _ = untied
    path = tmp_path / "tiny.gguf"
    export_gguf(params, mcfg, path, qtype="Q8_0")
    r = gguf.GGUFReader(path)
    meta = {k: r.get_field(k).contents() for k in r.fields if not k.startswith("GGUF.")}
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.model"] == "none"
    want = {"llama.block_count": 2, "llama.context_length": 16, "llama.embedding_length": 64,
            "llama.feed_forward_length": 128, "llama.attention.head_count": 8, "llama.attention.head_count_kv": 4,
            "llama.rope.dimension_count": 8, "llama.rope.freq_base": 10000.0, "llama.vocab_size": 256,
            "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0)}
    assert {k: meta[k] for k in want} == want
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert len(types) == 1 + 2 * 9 + 2  # token_embd, 9 per block, output_norm, output
    assert types["blk.1.ffn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == types["output.weight"] == "Q8_0"
    assert gguf_model_section(path) == {
        "name": "decoder", "style": "llama", "vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 8,
        "n_kv_heads": 4, "head_dim": 8, "d_ff": 128, "max_seq_len": 16, "tie_embeddings": False, "use_bias": False,
        "rope_theta": 10000.0, "norm_eps": 1e-5}


# Quantisation bounds per weight: F16 rounds to 11 significant bits, |dw| <= 2^-11 |w|, and below
# its normal range (2^-14) to multiples of 2^-24, |dw| <= 2^-25; Q8_0 stores each block of 32 as
# round(w / s) * s with s = max|w| / 127 kept in F16, so |dw| <= s / 2 (+ the F16 error of s, x127).
def weight_bound(w: np.ndarray, qtype: str) -> np.ndarray:
    if qtype == "F16":
        return np.maximum(np.abs(w) * 2.0**-11, 2.0**-25)
    blocks = np.abs(w.reshape(-1, 32))
    s = blocks.max(axis=1, keepdims=True) / 127
    return np.broadcast_to(s / 2 + s * 127 * 2.0**-11, blocks.shape).reshape(w.shape)


def per_matrix(params, fn):
    """``fn(key, w_gguf, w_ours_shape) -> new w_gguf`` over every matrix, in GGUF's (out, in) layout
    where Q8_0 blocks run along ``in``; norms (1-D per layer) are left alone."""
    out = []
    for key, var in nnx.to_flat_state(params):
        x = np.asarray(var.get_value())
        stacked = key[0] == "blocks"
        if x.ndim - stacked >= 2:
            m = TENSOR_MAP[tuple(key)]
            layers = [m.from_gguf(fn(key, m.to_gguf(xl)), xl.shape) for xl in (x if stacked else [x])]
            x = np.stack(layers) if stacked else layers[0]
        out.append((key, var.replace(jax.device_put(x, var.get_value().sharding))))
    return nnx.from_flat_state(out)


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_quantised_round_trip_within_the_quantisation_step(untied, tmp_path, qtype):
    """Every weight is within its quantisation bound, norms are exact, and the logits move no more
    than twice as much as under uniform noise of the full half-step on every weight (the
    quantisation error is at most that per weight, so it cannot move the logits further than
    noise of that size does, up to the factor 2 for the spread of random directions).
    Measured (max |logit| 6.9): F16 0.0141 against 0.0147 under the noise, Q8_0 0.27 against 0.33."""
    graphdef, params, frozen, mcfg, abstract = untied
    path = tmp_path / f"tiny-{qtype}.gguf"
    export_gguf(params, mcfg, path, qtype=qtype)
    loaded = load_gguf_params(path, abstract)
    for (key, want), (_, got) in zip(nnx.to_flat_state(params), nnx.to_flat_state(loaded)):
        if want.get_value().ndim - (key[0] == "blocks") == 1:
            np.testing.assert_array_equal(np.asarray(got.get_value()), np.asarray(want.get_value()), str(key))
    loaded_leaves = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(loaded)}

    for key, var in nnx.to_flat_state(params):
        w, g = np.asarray(var.get_value()), loaded_leaves[key]
        if w.ndim - (key[0] == "blocks") < 2:
            continue
        m = TENSOR_MAP[tuple(key)]
        for wl, gl in (zip(w, g) if key[0] == "blocks" else [(w, g)]):
            wq, gq = m.to_gguf(wl), m.to_gguf(gl)
            assert np.all(np.abs(gq - wq) <= weight_bound(wq, qtype) * (1 + 1e-6)), key
    rng = np.random.default_rng(3)
    noisy = per_matrix(params, lambda key, wq: wq + rng.uniform(-1, 1, wq.shape) * weight_bound(wq, qtype))
    ref = logits(graphdef, params, frozen, TOKENS)
    err = np.abs(logits(graphdef, loaded, frozen, TOKENS) - ref).max()
    noise_err = np.abs(logits(graphdef, noisy, frozen, TOKENS) - ref).max()
    assert 0 < err <= 2 * noise_err, (err, noise_err)


@pytest.fixture(scope="module")
def byte_vocab():
    """A small byte-level BPE vocabulary: the 256 byte symbols, 3 merges, 2 control tokens."""
    tokens = list(bytes_to_unicode().values()) + ["th", "the", "Ġthe", "<s>", "</s>"]
    return {"path": "byte-vocab", "model": "gpt2", "pre": "gpt2", "tokens": tokens,
            "merges": ["t h", "th e", "Ġ the"], "token_types": [1] * 259 + [3, 3],
            "bos_id": 259, "eos_id": 260, "pad_id": None, "unk_id": None, "add_bos": True,
            "chat_template": "{{ messages }}"}


@pytest.fixture(scope="module")
def tied_with_tokenizer(byte_vocab, tmp_path_factory):
    """A tied model with llama's optional biases (vocabulary 264: the byte vocabulary's 261 + 3
    unused), exported as F32 with the byte vocabulary."""
    built = build(tie=True, use_bias=True, vocab_size=264)
    path = tmp_path_factory.mktemp("gguf") / "tok.gguf"
    export_gguf(built[1], built[3], path, tokenizer_parts=byte_vocab)
    return built, path


def test_biases_round_trip(tied_with_tokenizer):
    """attn_q/k/v/output.bias and ffn_up/down.bias, the q/k biases permuted like their rows."""
    (graphdef, params, frozen, _, abstract), path = tied_with_tokenizer
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert {f"blk.1.{n}.bias" for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down")} <= names
    assert gguf_model_section(path)["use_bias"]
    loaded = load_gguf_params(path, abstract)
    for (key, want), (_, got) in zip(nnx.to_flat_state(params), nnx.to_flat_state(loaded)):
        np.testing.assert_array_equal(np.asarray(got.get_value()), np.asarray(want.get_value()), err_msg=str(key))
    np.testing.assert_allclose(logits(graphdef, loaded, frozen, TOKENS), logits(graphdef, params, frozen, TOKENS),
                               atol=1e-5, rtol=0)


def test_export_carries_the_tokenizer(tied_with_tokenizer, byte_vocab):
    path = tied_with_tokenizer[1]
    parts = gguf_tokenizer_parts(path)
    assert {**parts, "path": "byte-vocab"} == byte_vocab
    tok = build_gguf_tokenizer(parts)
    enc = tok.encode("the theme</s>")
    assert enc.tokens == ["<s>", "the", "Ġthe", "m", "e", "</s>"]
    assert tok.decode(enc.ids, skip_special_tokens=True) == "the theme"


# --- bad input ---


def test_shape_mismatch_names_the_tensor_and_both_shapes(untied_f32):
    path = untied_f32
    with pytest.raises(ConfigError) as e:
        load_gguf_params(path, abstract_params(tie=False, d_ff=192))
    assert str(e.value) == (f"{path}: tensor blk.0.ffn_down.weight has shape [128, 64] but the model needs [192, 64] "
                            "(GGUF order, ne0 first): build the model config from this file with gguf_model_section")


def test_missing_and_unexpected_tensors(untied_f32, tied_with_tokenizer):
    tied = tied_with_tokenizer[1]
    with pytest.raises(ConfigError) as e:
        load_gguf_params(tied, abstract_params(tie=False, use_bias=True, vocab_size=264))
    assert str(e.value) == (f"{tied}: tensor output.weight is missing (the model needs it for "
                            "params.lm_head): build the model config from this file with gguf_model_section")
    with pytest.raises(ConfigError) as e:
        load_gguf_params(untied_f32, abstract_params(tie=True, style="gpt2", n_kv_heads=0))
    assert str(e.value) == (f"{untied_f32}: model parameter pos_embed has no GGUF tensor in the llama tensor map"
                            ": load GGUF files into a decoder with style='llama'")
    with pytest.raises(ConfigError) as e:
        load_gguf_params(untied_f32, abstract_params(tie=True))
    assert str(e.value) == (f"{untied_f32}: tensors output.weight have no parameter in the model: "
                            "build the model config from this file with gguf_model_section")


def test_unsupported_quantisation_type(untied, untied_f32, tmp_path):
    bad = tmp_path / "q5.gguf"
    w = gguf.GGUFWriter(bad, "llama")
    for t in gguf.GGUFReader(untied_f32).tensors:
        if t.name == "blk.1.ffn_up.weight":  # Q5_0: 32 weights in 22 bytes
            rows, cols = t.data.shape
            w.add_tensor(t.name, np.zeros((rows, cols // 32 * 22), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q5_0)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError) as e:
        load_gguf_params(bad, untied[4])
    assert str(e.value) == (f"{bad}: tensor blk.1.ffn_up.weight is stored as Q5_0, which lmstack cannot dequantize "
                            "(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1): re-quantize the file with llama-quantize "
                            "to one of these")


def test_unsupported_architecture_and_metadata(tmp_path):
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(path, "falcon")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError) as e:
        gguf_model_section(path)
    assert str(e.value) == (f"{path}: general.architecture is 'falcon', but lmstack reads only llama GGUF files: "
                            "use a llama-architecture model (Llama, SmolLM2)")
    with pytest.raises(DataError) as e:
        gguf_tokenizer_parts(path)
    assert str(e.value) == (f"{path}: the GGUF file has no tokenizer (tokenizer.ggml.tokens): "
                            "give the tokenizer separately")
    with pytest.raises(ConfigError) as e:
        gguf_model_section(tmp_path / "absent.gguf")
    assert str(e.value) == f"{tmp_path / 'absent.gguf'}: no such GGUF file: check the path"


def test_unsupported_tokenizers_and_export_options(byte_vocab, untied, tmp_path):
    with pytest.raises(DataError) as e:
        build_gguf_tokenizer({**byte_vocab, "pre": "llama-bpe"})
    assert str(e.value) == ("byte-vocab: tokenizer.ggml.pre is 'llama-bpe'; lmstack knows the byte-level "
                            "pre-tokenizers gpt2, smollm: give the tokenizer separately")
    with pytest.raises(DataError) as e:
        build_gguf_tokenizer({**byte_vocab, "model": "llama"})
    assert str(e.value) == ("byte-vocab: tokenizer.ggml.model is 'llama'; lmstack rebuilds only byte-level BPE "
                            "('gpt2') GGUF tokenizers: give the tokenizer separately")
    _, params, _, mcfg, _ = untied
    out = tmp_path / "x.gguf"
    with pytest.raises(ConfigError) as e:
        export_gguf(params, mcfg, out, qtype="Q4_K")
    assert str(e.value) == f"GGUF export of {out}: qtype 'Q4_K' is not one of F32, F16, Q8_0"
    with pytest.raises(ConfigError) as e:
        export_gguf(params, mcfg.__class__(**{**mcfg.__dict__, "style": "gpt2"}), out)
    assert str(e.value) == (f"GGUF export of {out}: model.style is 'gpt2'; lmstack writes llama-architecture GGUF "
                            "files only: export a style='llama' decoder")
    assert not out.exists()
