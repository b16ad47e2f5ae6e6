"""Encoder-decoder transformer (T5 family).

Pre-norm blocks (RMSNorm by default), no biases, a bidirectional encoder (the
:class:`~lmstack.models.encoder.Encoder`, without its MLM head) and a causal decoder whose
blocks add cross-attention to the encoder output. Positions are T5's relative position
buckets (one bias table per stack, shared by its layers: bidirectional in the encoder,
causal in the decoder; none in cross-attention) or RoPE in self-attention. Encoder and
decoder share one token table by default; the output head is tied to the decoder's table
or separate.

Packed rows: encoder and decoder rows carry segment ids numbering the same examples, and a
decoder token attends only to encoder tokens of its own segment id (0 = padding). A decoder
token whose segment has no encoder token (a document that fell wholly into the targets)
gets nothing from cross-attention rather than a uniform average over other documents.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lmstack.models.encoder import Encoder, EncoderConfig, check_choice, derive_d_ff, style_default
from lmstack.models.attention_core import check_attention_impl
from lmstack.models.layers import (
    ACTIVATIONS,
    MLP,
    NORMS,
    REMAT_POLICIES,
    TRANSFORMER_CHOICES,
    TRANSFORMER_DEFAULTS,
    Attention,
    RelativePositionBias,
    attention_mask,
    dense,
    dropout,
    make_norm,
    param,
    segment_mask,
)
from lmstack.models.projection import adapter_key
from lmstack.registry import register
from lmstack.sharding import constrain

Array = jax.Array

POSITIONS = ("relative", "rope")
# config.model keys of the encoder-decoder, beyond every family's.
ENCODER_DECODER_DEFAULTS = dict(
    TRANSFORMER_DEFAULTS,
    positions="",  # "": relative (T5 buckets) | relative | rope
    norm="",  # "": from style (llama -> rmsnorm, gpt2 -> layernorm) | rmsnorm | layernorm
    activation="",  # "": from style (llama -> swiglu, gpt2 -> gelu) | swiglu | geglu | gelu | relu
    relpos_buckets=32,  # T5 relative position buckets (positions=relative)
    relpos_max_distance=128,  # distances beyond this share the last bucket
    n_encoder_layers=0,  # 0: n_layers
    n_decoder_layers=0,  # 0: n_layers
    share_embeddings=True,  # one token table for encoder and decoder
)


@dataclasses.dataclass(frozen=True)
class EncoderDecoderConfig:
    vocab_size: int
    d_model: int
    n_encoder_layers: int
    n_decoder_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_seq_len: int
    positions: str = "relative"
    norm: str = "rmsnorm"
    activation: str = "swiglu"
    share_embeddings: bool = True
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

    def __post_init__(self):
        check_choice("positions", self.positions, POSITIONS, "encoder_decoder")
        check_choice("norm", self.norm, NORMS, "encoder_decoder")
        check_choice("activation", self.activation, tuple(ACTIVATIONS), "encoder_decoder")
        check_attention_impl(self.attention_impl, self.dtype, self.head_dim, "encoder_decoder")

    @classmethod
    def from_config(cls, m: Any, *, vocab_size: int, max_seq_len: int) -> "EncoderDecoderConfig":
        """Resolve ``config.model``: ``positions=''`` means relative buckets (T5), layer
        counts of 0 mean ``n_layers``, other empty strings follow ``style``."""
        activation = style_default(m, "activation")
        check_choice("activation", activation, tuple(ACTIVATIONS), "encoder_decoder")
        return cls(
            vocab_size=m.vocab_size or vocab_size,
            d_model=m.d_model,
            n_encoder_layers=m.n_encoder_layers or m.n_layers,
            n_decoder_layers=m.n_decoder_layers or m.n_layers,
            n_heads=m.n_heads,
            n_kv_heads=m.n_kv_heads or m.n_heads,
            head_dim=m.head_dim or m.d_model // m.n_heads,
            d_ff=derive_d_ff(m, activation),
            max_seq_len=m.max_seq_len or max_seq_len,
            positions=m.positions or "relative",
            norm=style_default(m, "norm"),
            activation=activation,
            share_embeddings=m.share_embeddings,
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
        )

    def encoder_config(self) -> EncoderConfig:
        """The encoder half: a pre-norm :class:`EncoderConfig` without an MLM head."""
        return EncoderConfig(
            vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_encoder_layers,
            n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, d_ff=self.d_ff,
            max_seq_len=self.max_seq_len, positions=self.positions, norm=self.norm, norm_position="pre",
            activation=self.activation, mlm_head=False, use_bias=self.use_bias, dropout=self.dropout,
            rope_theta=self.rope_theta, relpos_buckets=self.relpos_buckets,
            relpos_max_distance=self.relpos_max_distance, norm_eps=self.norm_eps, init_std=self.init_std,
            dtype=self.dtype, remat=self.remat, scan_unroll=self.scan_unroll, attention_impl=self.attention_impl,
        )

    def flops_per_token(self, seq_len: int, decoder_len: int | None = None) -> float:
        """Training FLOPs per position (forward + backward), the decoder's PaLM convention,
        for ``seq_len`` encoder and ``decoder_len`` (default ``seq_len``) decoder positions:
        the whole example's FLOPs divided by ``seq_len + decoder_len``. Per example: 6 x
        matmul parameters x the positions they run over (encoder blocks: encoder positions;
        decoder blocks and the output head: decoder positions; cross-attention K/V
        projections: encoder positions) plus 12 x layers x heads x head_dim x query length
        x key length for encoder self-, decoder self- and cross-attention."""
        s, t = seq_len, decoder_len or seq_len
        d, n, k, h, v = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.vocab_size
        layer = self.encoder_config().layer_matmul_params()  # self-attention + MLP
        q_o, k_v = 2 * d * n * h, 2 * d * k * h
        enc = self.n_encoder_layers * layer * s
        dec = self.n_decoder_layers * ((layer + q_o) * t + k_v * s) + d * v * t
        attn = 12.0 * n * h * (self.n_encoder_layers * s * s + self.n_decoder_layers * (t * t + t * s))
        return (6.0 * (enc + dec) + attn) / (s + t)


class DecoderBlock(nnx.Module):
    """Pre-norm causal self-attention, cross-attention to the encoder, MLP."""

    def __init__(self, cfg: EncoderDecoderConfig, *, rngs: nnx.Rngs):
        out_std = cfg.init_std / math.sqrt(3 * cfg.n_decoder_layers)  # three residual branches per block
        d = cfg.d_model
        self.self_norm = make_norm(cfg.norm, d, cfg.norm_eps, cfg.use_bias)
        self.cross_norm = make_norm(cfg.norm, d, cfg.norm_eps, cfg.use_bias)
        self.mlp_norm = make_norm(cfg.norm, d, cfg.norm_eps, cfg.use_bias)
        self.self_attn = Attention(cfg, rngs=rngs, use_rope=cfg.positions == "rope", out_std=out_std)
        self.cross_attn = Attention(cfg, rngs=rngs, use_rope=False, out_std=out_std)
        self.mlp = MLP(cfg, rngs=rngs, activation=cfg.activation, out_std=out_std)
        self.dropout_rate = cfg.dropout

    def __call__(self, x_btd, encoded_bsd, doc_pos_bt, self_mask, cross_mask, has_context_bt1, self_bias, rng):
        r_self, r_cross, r_mlp = jax.random.split(rng, 3) if rng is not None else (None, None, None)
        h, _ = self.self_attn(self.self_norm(x_btd), doc_pos_bt, self_mask, None, None, bias_bnts=self_bias,
                              rng=adapter_key(r_self), causal=True)
        x_btd = x_btd + dropout(h, self.dropout_rate, r_self)
        h, _ = self.cross_attn(self.cross_norm(x_btd), doc_pos_bt, cross_mask, None, None, context_bsd=encoded_bsd,
                               rng=adapter_key(r_cross))
        x_btd = x_btd + dropout(h * has_context_bt1, self.dropout_rate, r_cross)
        x_btd = x_btd + dropout(self.mlp(self.mlp_norm(x_btd), adapter_key(r_mlp)), self.dropout_rate, r_mlp)
        return constrain(x_btd, ("batch", "activation_length", "activation_embed"))


@register("model.encoder_decoder")
class EncoderDecoder(nnx.Module):
    """``EncoderDecoder(cfg, rngs=...)(inputs, decoder_inputs)`` -> float32 logits
    ``(b, t_dec, vocab)``; ``encode`` then ``decode`` is the same computation in two parts."""

    config_class = EncoderDecoderConfig
    config_defaults = ENCODER_DECODER_DEFAULTS
    config_choices = dict(TRANSFORMER_CHOICES, positions=("",) + POSITIONS, norm=("",) + NORMS,
                          activation=("",) + tuple(ACTIVATIONS))

    def __init__(self, cfg: EncoderDecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg.encoder_config(), rngs=rngs)
        if not cfg.share_embeddings:
            self.decoder_embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        if cfg.positions == "relative":
            self.decoder_relpos = RelativePositionBias(cfg.n_heads, num_buckets=cfg.relpos_buckets,
                                                       max_distance=cfg.relpos_max_distance, bidirectional=False,
                                                       init_std=cfg.init_std, rngs=rngs)

        @nnx.split_rngs(splits=cfg.n_decoder_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> DecoderBlock:
            return DecoderBlock(cfg, rngs=rngs)

        self.decoder_blocks = make_blocks(rngs)
        self.decoder_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.use_bias)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)

    def _decoder_table(self) -> Array:
        return self.encoder.embed[...] if self.cfg.share_embeddings else self.decoder_embed[...]

    def encode(self, inputs_bt: Array, *, segment_ids: Array | None = None, positions: Array | None = None,
               rng: Array | None = None) -> Array:
        """Encoder hidden states ``(b, s, d)`` in the compute dtype (final norm applied)."""
        return self.encoder(inputs_bt, segment_ids=segment_ids, positions=positions, rng=rng)

    def features(self, tokens_bt: Array, segment_ids_bt: Array) -> Array:
        """One float32 vector per row: the encoder's pooled output, for probes and retrieval."""
        return self.encoder.features(tokens_bt, segment_ids_bt)

    def decode(
        self,
        encoded_bsd: Array,
        decoder_inputs_bt: Array,
        *,
        input_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None,
        rng: Array | None = None,
    ) -> Array:
        """Float32 logits ``(b, t, vocab)`` for ``decoder_inputs`` given the encoder output.

        ``input_segment_ids`` are the encoder's (default: one segment), matched against
        ``decoder_segment_ids`` for cross-attention; ``decoder_positions`` are positions
        inside each target (default 0..t-1)."""
        c = self.cfg
        b, t = decoder_inputs_bt.shape
        s = encoded_bsd.shape[1]
        dt = jnp.dtype(c.dtype)
        row = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        doc_pos = row if decoder_positions is None else decoder_positions
        dec_seg = jnp.ones((b, t), jnp.int32) if decoder_segment_ids is None else decoder_segment_ids
        enc_seg = jnp.ones((b, s), jnp.int32) if input_segment_ids is None else input_segment_ids
        self_mask = attention_mask(dec_seg, dec_seg, row, row)
        cross_mask = segment_mask(dec_seg, enc_seg)
        has_context = jnp.any(cross_mask[:, 0], axis=-1, keepdims=True).astype(dt)  # (b, t, 1)
        self_bias = self.decoder_relpos(doc_pos, doc_pos) if c.positions == "relative" else None

        table = self._decoder_table()
        x = table[decoder_inputs_bt].astype(dt)
        x = dropout(x, c.dropout, None if rng is None else jax.random.fold_in(rng, c.n_decoder_layers))
        x = constrain(x, ("batch", "activation_length", "activation_embed"))
        encoded_bsd = constrain(encoded_bsd.astype(dt), ("batch", "activation_length", "activation_embed"))
        layer_rngs = None if rng is None else jax.random.split(rng, c.n_decoder_layers)

        def body(x_btd, block, layer_rng):
            return block(x_btd, encoded_bsd, doc_pos, self_mask, cross_mask, has_context, self_bias, layer_rng)

        if c.remat != "none":
            body = nnx.remat(body, policy=REMAT_POLICIES[c.remat], prevent_cse=False)
        x = nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry,
                     unroll=min(c.scan_unroll, c.n_decoder_layers))(x, self.decoder_blocks, layer_rngs)
        x = self.decoder_norm(x)
        head = table.T if c.tie_embeddings else self.lm_head[...]
        logits = dense(x, head.astype(dt), out_dtype=jnp.float32)
        return constrain(logits, ("batch", "activation_length", "activation_vocab"))

    def __call__(
        self,
        inputs_bt: Array,
        decoder_inputs_bt: Array,
        *,
        input_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        input_positions: Array | None = None,
        decoder_positions: Array | None = None,
        rng: Array | None = None,
    ) -> Array:
        """Float32 logits ``(b, t_dec, vocab)``: encode ``inputs``, decode ``decoder_inputs``
        (teacher forcing: the targets shifted right by the objective)."""
        r_enc, r_dec = (None, None) if rng is None else (jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1))
        encoded = self.encode(inputs_bt, segment_ids=input_segment_ids, positions=input_positions, rng=r_enc)
        return self.decode(encoded, decoder_inputs_bt, input_segment_ids=input_segment_ids,
                           decoder_segment_ids=decoder_segment_ids, decoder_positions=decoder_positions, rng=r_dec)
