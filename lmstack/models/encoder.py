"""Encoder-only transformer (BERT family): bidirectional attention within each document.

Options chosen by config, so BERT and a modern pre-norm encoder are one file:

- positions: ``learned`` absolute (BERT), ``rope``, or ``relative`` (T5 buckets, one bias
  table shared by all layers);
- token-type embeddings (``type_vocab_size``; BERT's sentence A/B), added to the tokens;
- ``post`` LayerNorm after each residual add with a norm over the embeddings (BERT), or
  ``pre`` norm with a final norm (GPT-2 / Llama style);
- MLP activation ``gelu`` / ``swiglu`` / ``geglu`` / ``relu``;
- an MLM head over the tied (or a separate) output embedding, with BERT's optional
  dense + GELU + norm transform before it, and an optional pooler (dense + tanh).

Blocks are stacked (a leading ``layers`` axis) and run with ``nnx.scan`` like the decoder.
Padding is segment id 0: it never meets a real token in attention.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lmstack.models.attention_core import check_attention_impl
from lmstack.models.layers import (
    ACTIVATIONS,
    MLP,
    NORMS,
    POOLINGS,
    REMAT_POLICIES,
    TRANSFORMER_CHOICES,
    TRANSFORMER_DEFAULTS,
    Attention,
    RelativePositionBias,
    dense,
    dropout,
    make_norm,
    param,
    pool,
    segment_mask,
    zeros_param,
)
from lmstack.models.projection import Projection, adapter_key
from lmstack.registry import register
from lmstack.sharding import constrain

__all__ = ["Encoder", "EncoderConfig", "pool", "check_choice", "style_default", "derive_d_ff"]

Array = jax.Array

POSITIONS = ("learned", "rope", "relative")
NORM_POSITIONS = ("pre", "post")
_STYLE_DEFAULTS = {
    "llama": {"positions": "rope", "norm": "rmsnorm", "activation": "swiglu"},
    "gpt2": {"positions": "learned", "norm": "layernorm", "activation": "gelu"},
}


# config.model keys of the encoder (and, through it, the two towers), beyond every family's.
ENCODER_DEFAULTS = dict(
    TRANSFORMER_DEFAULTS,
    positions="",  # "": from style (llama -> rope, gpt2 -> learned) | learned | rope | relative (T5 buckets)
    norm="",  # "": from style (llama -> rmsnorm, gpt2 -> layernorm) | rmsnorm | layernorm
    norm_position="pre",  # pre | post (BERT)
    activation="",  # "": from style (llama -> swiglu, gpt2 -> gelu) | swiglu | geglu | gelu | relu
    relpos_buckets=32,  # T5 relative position buckets (positions=relative)
    relpos_max_distance=128,  # distances beyond this share the last bucket
    type_vocab_size=0,  # token-type embeddings (BERT: 2); 0: none
    mlm_head=True,  # False: no MLM parameters (a sentence encoder imported without them)
    mlm_transform=False,  # BERT MLM head: dense + GELU + norm before the tied output
    pooler=False,  # BERT pooler: dense + tanh on the pooled vector
    pooling="mean",  # how a sequence becomes one vector: mean | cls | last
)
ENCODER_CHOICES = dict(TRANSFORMER_CHOICES, positions=("",) + POSITIONS, norm=("",) + NORMS,
                       norm_position=NORM_POSITIONS, activation=("",) + tuple(ACTIVATIONS), pooling=POOLINGS)


def check_choice(key: str, value: Any, choices: tuple[str, ...], family: str) -> None:
    """A clear error for an unsupported option: which key, which model, what to choose."""
    if value not in choices:
        raise ValueError(f"model.{key}={value!r} is not supported by model.{family}: "
                         f"set --config.model.{key} to one of {', '.join(choices)}")


def style_default(m: Any, key: str) -> str:
    """``config.model.KEY``, or (when empty) the value implied by ``config.model.style``."""
    value = m[key]
    if value:
        return value
    if m.style not in _STYLE_DEFAULTS:
        raise ValueError(f"model.{key} is empty and model.style={m.style!r} implies no default: "
                         f"set --config.model.{key}, or model.style to one of {', '.join(_STYLE_DEFAULTS)}")
    return _STYLE_DEFAULTS[m.style][key]


def derive_d_ff(m: Any, activation: str) -> int:
    """``model.d_ff``, or when 0: the 8/3*d gated width rounded to 64, else 4*d."""
    if m.d_ff:
        return m.d_ff
    return 64 * math.ceil(8 * m.d_model / 3 / 64) if ACTIVATIONS[activation][1] else 4 * m.d_model


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_seq_len: int
    positions: str = "learned"
    norm: str = "layernorm"
    norm_position: str = "pre"
    activation: str = "gelu"
    type_vocab_size: int = 0
    mlm_head: bool = True  # False: no MLM parameters (the encoder half of encoder-decoder, two towers)
    mlm_transform: bool = False
    pooler: bool = False
    pooling: str = "mean"
    tie_embeddings: bool = True
    use_bias: bool = False
    dropout: float = 0.0
    rope_theta: float = 10000.0
    relpos_buckets: int = 32
    relpos_max_distance: int = 128
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: str = "float32"
    remat: str = "none"
    scan_unroll: int = 1
    attention_impl: str = "xla_einsum"  # xla_einsum | dot_product | cudnn (lmstack.models.attention_core)
    num_labels: int = 0  # > 0: a sequence-classification head ``classifier`` (HF BertForSequenceClassification)
    classifier_pooling: str = "cls"  # which vector the head reads: cls (BERT) | mean | last

    def __post_init__(self):
        self.check("encoder")

    def check(self, family: str) -> None:
        """Raise a clear error for an unsupported option, naming ``model.<family>``."""
        check_choice("positions", self.positions, POSITIONS, family)
        check_choice("norm", self.norm, NORMS, family)
        check_choice("norm_position", self.norm_position, NORM_POSITIONS, family)
        check_choice("activation", self.activation, tuple(ACTIVATIONS), family)
        check_choice("pooling", self.pooling, POOLINGS, family)
        check_choice("classifier_pooling", self.classifier_pooling, POOLINGS, family)
        check_attention_impl(self.attention_impl, self.dtype, self.head_dim, family)

    @classmethod
    def from_config(cls, m: Any, *, vocab_size: int, max_seq_len: int) -> "EncoderConfig":
        """Resolve ``config.model`` (zeros and empty strings mean 'derive it'). Errors name
        the configured family (``model.name``), as the two-tower model builds on this."""
        activation = style_default(m, "activation")
        check_choice("activation", activation, tuple(ACTIVATIONS), m.name)
        check_choice("positions", style_default(m, "positions"), POSITIONS, m.name)
        check_choice("norm", style_default(m, "norm"), NORMS, m.name)
        check_choice("norm_position", m.norm_position, NORM_POSITIONS, m.name)
        check_choice("pooling", m.pooling, POOLINGS, m.name)
        return cls(
            vocab_size=m.vocab_size or vocab_size,
            d_model=m.d_model,
            n_layers=m.n_layers,
            n_heads=m.n_heads,
            n_kv_heads=m.n_kv_heads or m.n_heads,
            head_dim=m.head_dim or m.d_model // m.n_heads,
            d_ff=derive_d_ff(m, activation),
            max_seq_len=m.max_seq_len or max_seq_len,
            positions=style_default(m, "positions"),
            norm=style_default(m, "norm"),
            norm_position=m.norm_position,
            activation=activation,
            type_vocab_size=m.type_vocab_size,
            mlm_head=m.mlm_head,  # False: an imported checkpoint without MLM weights
            mlm_transform=m.mlm_transform,
            pooler=m.pooler,
            pooling=m.pooling,
            tie_embeddings=m.tie_embeddings,
            use_bias=m.use_bias,
            dropout=m.dropout,
            rope_theta=m.rope_theta,
            relpos_buckets=m.relpos_buckets,
            relpos_max_distance=m.relpos_max_distance,
            norm_eps=m.norm_eps,
            init_std=m.init_std,
            dtype=m.dtype,
            remat=m.remat,
            scan_unroll=m.scan_unroll,
            attention_impl=m.get("attention_impl", "xla_einsum"),  # specs saved before the key lack it
            # only model.encoder has a head (the two towers lack the keys), and specs saved before it none
            num_labels=m.get("num_labels", 0),
            classifier_pooling=m.get("classifier_pooling", "cls"),
        )

    def layer_matmul_params(self) -> int:
        """Weights multiplied per token in one block (attention + MLP)."""
        d, f, n, k, h = self.d_model, self.d_ff, self.n_heads, self.n_kv_heads, self.head_dim
        return d * h * (2 * n + 2 * k) + d * f * (3 if ACTIVATIONS[self.activation][1] else 2)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), the decoder's PaLM convention:
        6 x matmul parameters (embedding lookups excluded; the MLM head, transform
        included, counted for every token) plus 12 x layers x heads x head_dim x sequence
        length for attention (every query sees the whole sequence, as PaLM counts too)."""
        head = (self.d_model * self.vocab_size + self.mlm_transform * self.d_model**2) if self.mlm_head else 0
        matmul_params = self.n_layers * self.layer_matmul_params() + head
        return 6.0 * matmul_params + 12.0 * self.n_layers * self.n_heads * self.head_dim * seq_len


class EncoderBlock(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.use_bias)
        self.mlp_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.use_bias)
        self.attn = Attention(cfg, rngs=rngs, use_rope=cfg.positions == "rope", out_std=out_std)
        self.mlp = MLP(cfg, rngs=rngs, activation=cfg.activation, out_std=out_std)
        self.post_norm = cfg.norm_position == "post"
        self.dropout_rate = cfg.dropout

    def __call__(self, x_btd, doc_pos_bt, mask_b1ts, bias_bnts, rng):
        r_attn, r_mlp = jax.random.split(rng) if rng is not None else (None, None)
        if self.post_norm:  # BERT: normalise after each residual add
            h, _ = self.attn(x_btd, doc_pos_bt, mask_b1ts, None, None, bias_bnts=bias_bnts, rng=adapter_key(r_attn))
            x_btd = self.attn_norm(x_btd + dropout(h, self.dropout_rate, r_attn))
            x_btd = self.mlp_norm(x_btd + dropout(self.mlp(x_btd, adapter_key(r_mlp)), self.dropout_rate, r_mlp))
        else:
            h, _ = self.attn(self.attn_norm(x_btd), doc_pos_bt, mask_b1ts, None, None, bias_bnts=bias_bnts,
                              rng=adapter_key(r_attn))
            x_btd = x_btd + dropout(h, self.dropout_rate, r_attn)
            x_btd = x_btd + dropout(self.mlp(self.mlp_norm(x_btd), adapter_key(r_mlp)), self.dropout_rate, r_mlp)
        return constrain(x_btd, ("batch", "activation_length", "activation_embed"))


@register("model.encoder")
class Encoder(nnx.Module):
    """``Encoder(cfg, rngs=...)(tokens)`` -> hidden states ``(b, t, d)`` in the compute dtype.

    ``lm_logits(hidden)`` gives float32 MLM logits; ``pooled(hidden, segment_ids)`` one
    vector per row (the configured pooling, then the pooler if any).
    """

    config_class = EncoderConfig
    config_defaults = dict(
        ENCODER_DEFAULTS,
        num_labels=0,  # > 0: add a sequence-classification head `classifier` with this many classes
        classifier_pooling="cls",  # the vector the head reads (then the pooler, if any): cls (BERT) | mean | last
    )
    config_choices = dict(ENCODER_CHOICES, classifier_pooling=POOLINGS)

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.d_model
        self.embed = param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), cfg.init_std)
        if cfg.positions == "learned":
            self.pos_embed = param(rngs, (cfg.max_seq_len, d), ("positions", "embed"), cfg.init_std)
        if cfg.type_vocab_size:
            self.type_embed = param(rngs, (cfg.type_vocab_size, d), ("token_types", "embed"), cfg.init_std)
        if cfg.positions == "relative":
            self.relpos = RelativePositionBias(cfg.n_heads, num_buckets=cfg.relpos_buckets,
                                               max_distance=cfg.relpos_max_distance, bidirectional=True,
                                               init_std=cfg.init_std, rngs=rngs)
        post = cfg.norm_position == "post"
        # post-LN normalises the embeddings before the first block and ends un-normalised
        # (every block output already is); pre-LN needs a final norm instead.
        self.embed_norm = make_norm(cfg.norm, d, cfg.norm_eps, cfg.use_bias) if post else None
        self.final_norm = None if post else make_norm(cfg.norm, d, cfg.norm_eps, cfg.use_bias)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> EncoderBlock:
            return EncoderBlock(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)

        if cfg.mlm_head and cfg.mlm_transform:
            # a d x d matrix: its output width is sharded like an MLP hidden
            self.mlm_dense = Projection((d,), (d,), ("embed", "mlp"), std=cfg.init_std, bias=cfg.use_bias, rngs=rngs,
                                        dtype=cfg.dtype)
            self.mlm_norm = make_norm(cfg.norm, d, cfg.norm_eps, cfg.use_bias)
        if cfg.mlm_head and not cfg.tie_embeddings:
            self.lm_head = param(rngs, (d, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)
        if cfg.mlm_head and cfg.use_bias:
            self.lm_bias = zeros_param((cfg.vocab_size,), ("vocab",))
        if cfg.pooler:
            self.pooler_dense = Projection((d,), (d,), ("embed", "mlp"), std=cfg.init_std, bias=cfg.use_bias,
                                           rngs=rngs, dtype=cfg.dtype)
        if cfg.num_labels:  # HF BertForSequenceClassification's `classifier`, on the pooled output
            self.classifier = Projection((d,), (cfg.num_labels,), ("embed", "labels"), std=cfg.init_std, bias=True,
                                         rngs=rngs, dtype=cfg.dtype)

    def __call__(
        self,
        tokens_bt: Array,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        token_types: Array | None = None,
        rng: Array | None = None,
    ) -> Array:
        """Hidden states for ``tokens``. ``segment_ids`` number the documents of a packed row
        (0 = padding; default: one document); ``positions`` are positions inside each
        document (default 0..t-1); ``token_types`` index the token-type table (default 0)."""
        c = self.cfg
        b, t = tokens_bt.shape
        dt = jnp.dtype(c.dtype)
        seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
        doc_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if positions is None else positions
        mask = segment_mask(seg, seg)
        bias = self.relpos(doc_pos, doc_pos) if c.positions == "relative" else None

        x = self.embed[...][tokens_bt].astype(dt)
        if c.positions == "learned":
            x = x + self.pos_embed[...][doc_pos].astype(dt)
        if c.type_vocab_size:
            types = jnp.zeros((b, t), jnp.int32) if token_types is None else token_types
            x = x + self.type_embed[...][types].astype(dt)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = dropout(x, c.dropout, None if rng is None else jax.random.fold_in(rng, c.n_layers))
        x = constrain(x, ("batch", "activation_length", "activation_embed"))
        layer_rngs = None if rng is None else jax.random.split(rng, c.n_layers)

        def body(x_btd, block, layer_rng):
            return block(x_btd, doc_pos, mask, bias, layer_rng)

        if c.remat != "none":
            body = nnx.remat(body, policy=REMAT_POLICIES[c.remat], prevent_cse=False)
        x = nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry, unroll=min(c.scan_unroll, c.n_layers))(
            x, self.blocks, layer_rngs
        )
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x

    def lm_logits(self, hidden_btd: Array) -> Array:
        """Float32 MLM logits ``(..., vocab)`` from hidden states (any leading shape, e.g. only
        the masked positions gathered by the objective)."""
        c = self.cfg
        if not c.mlm_head:
            raise ValueError("this encoder was built without an MLM head (mlm_head=False)")
        dt = jnp.dtype(c.dtype)
        x = hidden_btd.astype(dt)
        if c.mlm_transform:  # BERT's prediction-head transform
            x = self.mlm_dense(x)
            x = self.mlm_norm(jax.nn.gelu(x, approximate=False))
        head = self.embed[...].T if c.tie_embeddings else self.lm_head[...]
        logits = dense(x, head.astype(dt), out_dtype=jnp.float32)
        if c.use_bias:
            logits = logits + self.lm_bias[...]
        if logits.ndim == 3:
            logits = constrain(logits, ("batch", "activation_length", "activation_vocab"))
        return logits

    def features(self, tokens_bt: Array, segment_ids_bt: Array) -> Array:
        """One float32 vector per row (the configured pooling), for probes and retrieval."""
        return self.pooled(self(tokens_bt, segment_ids=segment_ids_bt), segment_ids_bt)

    def classify(self, tokens_bt: Array, segment_ids_bt: Array, rng: Array | None = None) -> Array:
        """Float32 class logits (b, num_labels) of one sequence per row (padding: segment 0):
        :meth:`pooled` with ``classifier_pooling`` (BERT: ``cls`` with ``pooler=True``), dropout
        while training, then ``classifier`` (weight (d, labels), bias), as HF
        BertForSequenceClassification. Raises ValueError for an encoder built without a head."""
        c = self.cfg
        if not c.num_labels:
            raise ValueError("this encoder has no classification head (model.num_labels=0): "
                             "set --config.model.num_labels to the number of classes")
        x = self.pooled(self(tokens_bt, segment_ids=segment_ids_bt, rng=rng), segment_ids_bt, c.classifier_pooling)
        x = dropout(x, c.dropout, None if rng is None else jax.random.fold_in(rng, c.n_layers + 1))
        return self.classifier(x, out_dtype=jnp.float32)

    def pooled(self, hidden_btd: Array, segment_ids_bt: Array | None = None, kind: str | None = None) -> Array:
        """One float32 vector per row (b, d): :func:`pool` with ``kind`` (default: the
        configured pooling), then the pooler (dense + tanh) if configured. BERT's pooled
        output is ``kind='cls'`` with ``pooler=True``."""
        c = self.cfg
        x = pool(hidden_btd, segment_ids_bt, kind or c.pooling)
        if c.pooler:
            x = jnp.tanh(self.pooler_dense(x, out_dtype=jnp.float32))
        return x
