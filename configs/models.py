"""Published model sizes: each function sets a config's ``model`` section to the
architecture of a released checkpoint (its Hugging Face ``config.json``), so an experiment
trains that shape from scratch, or checks ``init.from`` against it.

Every function sets the family (``model.name``), the sizes and the architectural options,
and leaves run options (``dtype``, ``remat``, ``scan_unroll``, ``dropout``) to the
experiment. ``SIZES`` maps the names used in experiment variants (``size=llama3-8b``) to
the functions. tests/test_configs.py checks each size's parameter count against the
published figure.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections as mlc


def _set(c: mlc.ConfigDict, **model: Any) -> None:
    for key, value in model.items():
        c.model[key] = value


def _llama(c: mlc.ConfigDict, **model: Any) -> None:
    """HF ``LlamaForCausalLM``: RMSNorm (eps 1e-5), RoPE, SwiGLU, grouped-query attention, no biases."""
    _set(c, **{**dict(name="decoder", style="llama", activation="swiglu", use_bias=False, qkv_bias=False,
                      norm_eps=1e-5, head_dim=0, rope_scaling=""), **model})


def _llama32(c: mlc.ConfigDict, **model: Any) -> None:
    """Llama 3.2: tied embeddings, RoPE theta 500,000 with the ``llama3`` frequency scaling
    (factor 32, low / high frequency factors 1 / 4, original context 8192), 131,072 positions."""
    _llama(c, vocab_size=128_256, rope_theta=500_000.0, tie_embeddings=True, max_seq_len=131_072,
           rope_scaling="llama3", **model)
    _set(c, rope_scaling_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
         rope_original_max_position_embeddings=8192)


def smollm2_135m(c: mlc.ConfigDict) -> None:
    """HuggingFaceTB/SmolLM2-135M: 30 layers, d=576, 9 heads / 3 KV heads, d_ff 1536,
    vocabulary 49,152, tied, RoPE theta 100,000, 8192 positions."""
    _llama(c, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536, vocab_size=49_152,
           rope_theta=100_000.0, tie_embeddings=True, max_seq_len=8192)


def smollm2_360m(c: mlc.ConfigDict) -> None:
    """HuggingFaceTB/SmolLM2-360M: 32 layers, d=960, 15 heads / 5 KV heads, d_ff 2560,
    vocabulary 49,152, tied, RoPE theta 100,000, 8192 positions."""
    _llama(c, d_model=960, n_layers=32, n_heads=15, n_kv_heads=5, d_ff=2560, vocab_size=49_152,
           rope_theta=100_000.0, tie_embeddings=True, max_seq_len=8192)


def smollm2_1_7b(c: mlc.ConfigDict) -> None:
    """HuggingFaceTB/SmolLM2-1.7B: 24 layers, d=2048, 32 heads (no grouping), d_ff 8192,
    vocabulary 49,152, tied, RoPE theta 130,000, 8192 positions."""
    _llama(c, d_model=2048, n_layers=24, n_heads=32, n_kv_heads=32, d_ff=8192, vocab_size=49_152,
           rope_theta=130_000.0, tie_embeddings=True, max_seq_len=8192)


def llama3_2_1b(c: mlc.ConfigDict) -> None:
    """meta-llama/Llama-3.2-1B: 16 layers, d=2048, 32 heads / 8 KV heads (head_dim 64), d_ff 8192."""
    _llama32(c, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192)


def llama3_2_3b(c: mlc.ConfigDict) -> None:
    """meta-llama/Llama-3.2-3B: 28 layers, d=3072, 24 heads / 8 KV heads (head_dim 128), d_ff 8192."""
    _llama32(c, d_model=3072, n_layers=28, n_heads=24, n_kv_heads=8, d_ff=8192)


def llama3_8b(c: mlc.ConfigDict) -> None:
    """meta-llama/Meta-Llama-3-8B: 32 layers, d=4096, 32 heads / 8 KV heads, d_ff 14,336,
    vocabulary 128,256, untied, RoPE theta 500,000 (no scaling), 8192 positions."""
    _llama(c, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14_336, vocab_size=128_256,
           rope_theta=500_000.0, tie_embeddings=False, max_seq_len=8192)


def _gpt2(c: mlc.ConfigDict, **model: Any) -> None:
    """OpenAI GPT-2 (HF ``GPT2LMHeadModel``): LayerNorm (eps 1e-5), learned positions (1024),
    tanh-approximated GELU, biases everywhere, tied embeddings, vocabulary 50,257, d_ff 4d."""
    _set(c, name="decoder", style="gpt2", activation="gelu_tanh", use_bias=True, qkv_bias=False, norm_eps=1e-5,
         vocab_size=50_257, max_seq_len=1024, tie_embeddings=True, n_kv_heads=0, head_dim=0, d_ff=0, **model)


def gpt2_small(c: mlc.ConfigDict) -> None:
    """openai-community/gpt2 (124M): 12 layers, d=768, 12 heads."""
    _gpt2(c, d_model=768, n_layers=12, n_heads=12)


def gpt2_medium(c: mlc.ConfigDict) -> None:
    """openai-community/gpt2-medium (355M): 24 layers, d=1024, 16 heads."""
    _gpt2(c, d_model=1024, n_layers=24, n_heads=16)


def t5_base(c: mlc.ConfigDict) -> None:
    """google-t5/t5-base (T5 v1.0): 12 + 12 layers, d=768, 12 heads of 64, d_ff 3072 ReLU MLP,
    RMS LayerNorm without bias (eps 1e-6), 32 relative-position buckets up to distance 128,
    one token table shared by encoder, decoder and output head, vocabulary 32,128."""
    _set(c, name="encoder_decoder", style="llama", positions="relative", norm="rmsnorm", activation="relu",
         d_model=768, n_layers=12, n_encoder_layers=12, n_decoder_layers=12, n_heads=12, n_kv_heads=0, head_dim=64,
         d_ff=3072, vocab_size=32_128, relpos_buckets=32, relpos_max_distance=128, share_embeddings=True,
         tie_embeddings=True, use_bias=False, norm_eps=1e-6, max_seq_len=512)


def bert_base(c: mlc.ConfigDict) -> None:
    """google-bert/bert-base-uncased: 12 layers, d=768, 12 heads, d_ff 3072 exact-GELU MLP,
    post-LayerNorm (eps 1e-12), biases, 512 learned positions, 2 token types, vocabulary
    30,522, the pooler and the MLM head with its transform (``BertForPreTraining`` without
    the next-sentence head)."""
    _set(c, name="encoder", style="gpt2", positions="learned", norm="layernorm", norm_position="post",
         activation="gelu", d_model=768, n_layers=12, n_heads=12, n_kv_heads=0, head_dim=0, d_ff=3072,
         vocab_size=30_522, max_seq_len=512, type_vocab_size=2, use_bias=True, norm_eps=1e-12,
         mlm_head=True, mlm_transform=True, pooler=True, tie_embeddings=True)


def minilm_l6(c: mlc.ConfigDict) -> None:
    """sentence-transformers/all-MiniLM-L6-v2 (``BertModel`` of nreimers/MiniLM-L6-H384-uncased):
    6 layers, d=384, 12 heads, d_ff 1536 exact-GELU MLP, post-LayerNorm (eps 1e-12), biases,
    512 learned positions, 2 token types, vocabulary 30,522 (BERT uncased WordPiece), the
    pooler, no MLM head: 22,713,216 parameters, every tensor of its ``model.safetensors``.
    sentence-transformers reads it without the pooler (mean pooling): ``pooler=False`` and
    ``pooling='mean'`` give the architecture ``init.from`` its directory builds (22,565,376)."""
    # no style: the keys it would imply are set, and the importer leaves it at the default
    _set(c, name="encoder", positions="learned", norm="layernorm", norm_position="post",
         activation="gelu", d_model=384, n_layers=6, n_heads=12, n_kv_heads=0, head_dim=0, d_ff=1536,
         vocab_size=30_522, max_seq_len=512, type_vocab_size=2, use_bias=True, norm_eps=1e-12,
         mlm_head=False, mlm_transform=False, pooler=True, tie_embeddings=True)


SIZES: dict[str, Callable[[mlc.ConfigDict], None]] = {
    "smollm2-135m": smollm2_135m,
    "smollm2-360m": smollm2_360m,
    "smollm2-1.7b": smollm2_1_7b,
    "llama3.2-1b": llama3_2_1b,
    "llama3.2-3b": llama3_2_3b,
    "llama3-8b": llama3_8b,
    "gpt2-small": gpt2_small,
    "gpt2-medium": gpt2_medium,
    "t5-base": t5_base,
    "bert-base": bert_base,
    "minilm-l6": minilm_l6,
}
