"""Decoder-only transformer in two styles chosen by config.

- ``llama``: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, untied or
  tied embeddings.
- ``gpt2``: LayerNorm, learned absolute positions, GELU MLP, optional biases, tied
  embeddings (nanoGPT's model).

Options for the open-weight families (see ``lmstack.interop.hf``): ``activation``
(``gelu_tanh`` for OpenAI GPT-2), ``qkv_bias`` (Qwen2), ``rope_scaling='llama3'``
(Llama 3.1) and ``sliding_window`` (Mistral v0.1).

The blocks are created stacked (a leading ``layers`` axis on every block parameter) and
run with ``nnx.scan``, so compile time does not grow with depth. Attention is restricted to
the query's own document (segment ids), so packed sequences never leak across documents.
An optional prefix mask turns it into a prefix LM (bidirectional over each document's
prefix, causal after it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lmstack.models.attention_core import check_attention_impl
from lmstack.models.encoder import check_choice
from lmstack.models.layers import (
    ACTIVATIONS,
    MLP,
    REMAT_POLICIES,
    POOLINGS,
    TRANSFORMER_CHOICES,
    TRANSFORMER_DEFAULTS,
    Attention,
    LayerNorm,
    Llama3RopeScaling,
    RMSNorm,
    attention_mask,
    dense,
    dropout,
    param,
    pool,
)
from lmstack.models.projection import Projection, adapter_key
from lmstack.registry import register
from lmstack.sharding import constrain

Array = jax.Array

STYLE_ACTIVATIONS = {"llama": "swiglu", "gpt2": "gelu"}
ROPE_SCALINGS = ("llama3",)  # or "" for none


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    style: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_seq_len: int
    tie_embeddings: bool = True
    use_bias: bool = False
    dropout: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: str = "float32"
    remat: str = "none"
    scan_unroll: int = 1
    attention_impl: str = "xla_einsum"  # xla_einsum | dot_product | cudnn (lmstack.models.attention_core)
    activation: str = ""  # "": from style (llama -> swiglu, gpt2 -> gelu) | any of layers.ACTIVATIONS
    qkv_bias: bool = False  # biases on the q/k/v projections only (Qwen2)
    rope_scaling: str = ""  # "" | llama3 (Llama 3.1, with the four fields below; HF rope_scaling names)
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    sliding_window: int = 0  # 0: full causal attention; else each query sees this many keys (Mistral)
    num_labels: int = 0  # > 0: a sequence-classification head ``score`` (HF LlamaForSequenceClassification)
    classifier_pooling: str = "last"  # which hidden state ``score`` reads: last | mean | cls (layers.POOLINGS)

    def __post_init__(self):
        if self.activation:  # empty: from the style
            check_choice("activation", self.activation, tuple(ACTIVATIONS), "decoder")
        check_choice("classifier_pooling", self.classifier_pooling, POOLINGS, "decoder")
        if self.rope_scaling:  # empty: none
            check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS, "decoder")
        check_attention_impl(self.attention_impl, self.dtype, self.head_dim, "decoder")

    @property
    def mlp_activation(self) -> str:
        """The MLP's entry of ``layers.ACTIVATIONS``: ``activation``, or the style's."""
        return self.activation or STYLE_ACTIVATIONS[self.style]

    def rope_scaling_params(self) -> Llama3RopeScaling | None:
        if self.rope_scaling != "llama3":
            return None
        return Llama3RopeScaling(self.rope_scaling_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                                 self.rope_original_max_position_embeddings)

    @classmethod
    def from_config(cls, m: Any, *, vocab_size: int, max_seq_len: int) -> "DecoderConfig":
        """Resolve ``config.model`` (zeros mean 'derive it') into a frozen model config."""
        head_dim = m.head_dim or m.d_model // m.n_heads
        if m.activation:
            check_choice("activation", m.activation, tuple(ACTIVATIONS), "decoder")
        gated = ACTIVATIONS[m.activation or STYLE_ACTIVATIONS[m.style]][1]
        if m.d_ff:
            d_ff = m.d_ff
        elif gated:
            d_ff = 64 * math.ceil(8 * m.d_model / 3 / 64)
        else:
            d_ff = 4 * m.d_model
        return cls(
            style=m.style,
            vocab_size=m.vocab_size or vocab_size,
            d_model=m.d_model,
            n_layers=m.n_layers,
            n_heads=m.n_heads,
            n_kv_heads=m.n_kv_heads or m.n_heads,
            head_dim=head_dim,
            d_ff=d_ff,
            max_seq_len=m.max_seq_len or max_seq_len,
            tie_embeddings=m.tie_embeddings,
            use_bias=m.use_bias,
            dropout=m.dropout,
            rope_theta=m.rope_theta,
            norm_eps=m.norm_eps,
            init_std=m.init_std,
            dtype=m.dtype,
            remat=m.remat,
            scan_unroll=m.scan_unroll,
            attention_impl=m.get("attention_impl", "xla_einsum"),  # specs saved before the key lack it
            activation=m.activation or STYLE_ACTIVATIONS[m.style],
            qkv_bias=m.qkv_bias,
            rope_scaling=m.rope_scaling,
            rope_scaling_factor=m.rope_scaling_factor,
            rope_low_freq_factor=m.rope_low_freq_factor,
            rope_high_freq_factor=m.rope_high_freq_factor,
            rope_original_max_position_embeddings=m.rope_original_max_position_embeddings,
            sliding_window=m.sliding_window,
            # saved specs and imported models from before the head existed lack the keys
            num_labels=m.get("num_labels", 0),
            classifier_pooling=m.get("classifier_pooling", "last"),
        )

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B convention:
        6 x matmul parameters (embedding lookups excluded, the output head included)
        plus 12 x layers x heads x head_dim x sequence length for attention."""
        d, f, n, k, h, v = self.d_model, self.d_ff, self.n_heads, self.n_kv_heads, self.head_dim, self.vocab_size
        attn = d * h * (2 * n + 2 * k)
        mlp = d * f * (3 if ACTIVATIONS[self.mlp_activation][1] else 2)
        matmul_params = self.n_layers * (attn + mlp) + d * v
        return 6.0 * matmul_params + 12.0 * self.n_layers * n * h * seq_len


class Block(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        if cfg.style == "llama":
            self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        else:
            self.attn_norm = LayerNorm(cfg.d_model, cfg.norm_eps, cfg.use_bias)
            self.mlp_norm = LayerNorm(cfg.d_model, cfg.norm_eps, cfg.use_bias)
        self.attn = Attention(cfg, rngs=rngs, qkv_bias=cfg.qkv_bias, rope_scaling=cfg.rope_scaling_params(),
                              sliding_window=cfg.sliding_window)
        self.mlp = MLP(cfg, rngs=rngs, activation=cfg.mlp_activation)
        self.dropout_rate = cfg.dropout
        # bottleneck adapters on each sublayer's output, set by lmstack.peft.adapter
        self.attn_adapter: nnx.Module | None = nnx.data(None)
        self.mlp_adapter: nnx.Module | None = nnx.data(None)

    def __call__(self, x_btd, doc_pos_bt, mask_b1ts, kv, cache_index, rng, causal=False):
        r_attn, r_mlp = jax.random.split(rng) if rng is not None else (None, None)
        h, kv = self.attn(self.attn_norm(x_btd), doc_pos_bt, mask_b1ts, kv, cache_index, rng=adapter_key(r_attn),
                          causal=causal)
        h = dropout(h, self.dropout_rate, r_attn)
        x_btd = x_btd + (h if self.attn_adapter is None else self.attn_adapter(h))
        h = dropout(self.mlp(self.mlp_norm(x_btd), adapter_key(r_mlp)), self.dropout_rate, r_mlp)
        x_btd = x_btd + (h if self.mlp_adapter is None else self.mlp_adapter(h))
        return constrain(x_btd, ("batch", "activation_length", "activation_embed")), kv


@register("model.decoder")
class Decoder(nnx.Module):
    """``Decoder(cfg, rngs=...)(tokens)`` -> float32 logits ``(b, t, vocab)``."""

    config_class = DecoderConfig
    config_defaults = dict(
        TRANSFORMER_DEFAULTS,
        activation="",  # "": from style (llama -> swiglu, gpt2 -> gelu) | swiglu | geglu | gelu | relu | gelu_tanh
        qkv_bias=False,  # biases on the q/k/v projections only (Qwen2)
        rope_scaling="",  # "" | llama3 (Llama 3.1 frequency scaling, with the HF rope_scaling fields below)
        rope_scaling_factor=8.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_position_embeddings=8192,
        sliding_window=0,  # 0: full causal attention; else keys within this many positions (Mistral)
        num_labels=0,  # > 0: add a sequence-classification head `score` with this many classes (objective.classify)
        classifier_pooling="last",  # the head reads the last non-padding token (HF) | mean | cls (the first)
    )
    config_choices = dict(TRANSFORMER_CHOICES, activation=("",) + tuple(ACTIVATIONS), rope_scaling=("", "llama3"),
                          classifier_pooling=POOLINGS)

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        if cfg.style == "gpt2":
            self.pos_embed = param(rngs, (cfg.max_seq_len, cfg.d_model), ("positions", "embed"), cfg.init_std)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        if cfg.style == "llama":
            self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        else:
            self.final_norm = LayerNorm(cfg.d_model, cfg.norm_eps, cfg.use_bias)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)
        # (n_virtual, d) virtual token embeddings prepended to every row, set by lmstack.peft.prompt_tuning
        self.soft_prompt: nnx.Param | None = nnx.data(None)
        if cfg.num_labels:  # HF LlamaForSequenceClassification's bias-free `score`
            self.score = Projection((cfg.d_model,), (cfg.num_labels,), ("embed", "labels"), std=cfg.init_std,
                                    rngs=rngs, dtype=cfg.dtype)

    def init_cache(self, batch: int, max_len: int, left_pad: Array | None = None) -> dict[str, Array]:
        """An empty KV cache for ``max_len`` tokens (prompt + generated). With a soft prompt it
        has ``n_virtual`` rows more, already holding the virtual tokens (index past them).

        ``left_pad`` (int32 (batch,)): how many padding tokens start each row's prompt
        (left padding, as HF batches prompts for generation). No query attends to them and
        each row's positions start at 0 on its first real token (after any virtual tokens),
        so a padded row continues exactly as its prompt alone would."""
        c = self.cfg
        n_virtual = 0 if self.soft_prompt is None else self.soft_prompt.shape[0]
        shape = (c.n_layers, batch, max_len + n_virtual, c.n_kv_heads, c.head_dim)
        dt = jnp.dtype(c.dtype)
        cache = {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt), "index": jnp.zeros((), jnp.int32)}
        if n_virtual:
            prompt_bnd = jnp.broadcast_to(self.soft_prompt[...], (batch,) + self.soft_prompt.shape)
            cache = self.hidden(None, inputs_embeds=prompt_bnd, cache=cache)[1]
        if left_pad is not None:
            cache["left_pad"] = jnp.asarray(left_pad, jnp.int32)
        return cache

    def __call__(
        self,
        tokens_bt: Array | None,
        *,
        inputs_embeds: Array | None = None,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        prefix_mask: Array | None = None,
        cache: dict[str, Array] | None = None,
        rng: Array | None = None,
    ) -> Array | tuple[Array, dict[str, Array]]:
        """Logits for ``tokens`` (or for ``inputs_embeds`` (b, t, d) in their place, HF's
        ``inputs_embeds``); with ``cache``, also the cache advanced past them.

        ``positions`` are positions inside each document (default 0..t-1, or continuing
        from the cache); ``segment_ids`` number the documents of a packed row (equal ids
        attend to each other; default: one document).

        ``prefix_mask`` (booleans (b, t), True on each document's prefix) makes a prefix
        LM: prefix tokens attend to each other bidirectionally within their document, the
        rest stays causal. With a cache, the prefix must arrive in one call (the prefill);
        earlier cache entries are seen causally, as they are earlier anyway.
        """
        x, cache = self.hidden(tokens_bt, inputs_embeds=inputs_embeds, positions=positions, segment_ids=segment_ids,
                               prefix_mask=prefix_mask, cache=cache, rng=rng)
        logits = self.logits(x)
        return logits if cache is None else (logits, cache)

    def output_head(self) -> Array:
        """The float32 ``(d_model, vocab)`` matrix the final hidden states are multiplied by:
        ``lm_head``, or the embedding table transposed when the embeddings are tied (HF
        ``get_output_embeddings``). Losses that chunk the logits (:mod:`lmstack.token_logps`)
        take it with :meth:`hidden`."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

    def logits(self, x_btd: Array) -> Array:
        """Float32 logits (b, t, vocab) of final hidden states (b, t, d) from :meth:`hidden`."""
        logits = dense(x_btd, self.output_head().astype(x_btd.dtype), out_dtype=jnp.float32)
        return constrain(logits, ("batch", "activation_length", "activation_vocab"))

    def features(self, tokens_bt: Array, segment_ids_bt: Array) -> Array:
        """One float32 vector per row: the final hidden states averaged over the tokens
        (segment id > 0), for probes and retrieval."""
        return pool(self.hidden(tokens_bt, segment_ids=segment_ids_bt)[0], segment_ids_bt, "mean")

    def classify(self, tokens_bt: Array, segment_ids_bt: Array, rng: Array | None = None) -> Array:
        """Float32 class logits (b, num_labels) of one sequence per row (padding: segment 0):
        the final hidden states pooled by ``classifier_pooling`` (default ``last``, the last
        non-padding token, as HF LlamaForSequenceClassification) times ``score.weight`` (d, labels).
        Raises ValueError for a decoder built without a head (``num_labels=0``)."""
        if not self.cfg.num_labels:
            raise ValueError("this decoder has no classification head (model.num_labels=0): "
                             "set --config.model.num_labels to the number of classes")
        x, _ = self.hidden(tokens_bt, segment_ids=segment_ids_bt, rng=rng)
        return self.score(pool(x, segment_ids_bt, self.cfg.classifier_pooling), out_dtype=jnp.float32)

    def hidden(self, tokens_bt: Array | None, *, inputs_embeds: Array | None = None, positions: Array | None = None,
               segment_ids: Array | None = None, prefix_mask: Array | None = None,
               cache: dict[str, Array] | None = None,
               rng: Array | None = None) -> tuple[Array, dict[str, Array] | None]:
        """Final (normed) hidden states, and the advanced cache if one was given. Without a
        cache a soft prompt is prepended (see :func:`prepend_soft_prompt`) and its positions
        dropped from the output; with one, :meth:`init_cache` has already run it."""
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        x = (self.embed[...][tokens_bt] if inputs_embeds is None else inputs_embeds).astype(dt)
        b, t = x.shape[:2]
        start = cache["index"] if cache is not None else 0
        row_q = start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        doc_pos = row_q if positions is None else positions
        seg_q = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
        if cache is not None and "left_pad" in cache:
            seg_q, doc_pos = self.skip_left_padding(row_q, cache["left_pad"], positions)
        # causal: no query sees a later key of its row (a kernel may skip those blocks);
        # mask None: nothing but that (one document per row), so a kernel need not read a mask
        causal = cache is None and prefix_mask is None
        if cache is None:
            mask = None
            if segment_ids is not None or prefix_mask is not None or self.soft_prompt is not None:
                mask = attention_mask(seg_q, seg_q, row_q, row_q, q_prefix_bt=prefix_mask, k_prefix_bs=prefix_mask,
                                      sliding_window=c.sliding_window)
            kv_in, k_valid = None, None
        else:
            s = cache["k"].shape[2]
            row_k = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            k_valid = row_k < start + t
            k_prefix = None
            if prefix_mask is not None:  # this chunk's prefix flags at its place in the cache
                k_prefix = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((b, s), bool), prefix_mask, start, axis=1)
            seg_k = jnp.ones((b, s), jnp.int32)
            if "left_pad" in cache:
                seg_k = self.skip_left_padding(row_k, cache["left_pad"])[0]
            mask = attention_mask(seg_q, seg_k, row_q, row_k, k_valid,
                                  q_prefix_bt=prefix_mask, k_prefix_bs=k_prefix, sliding_window=c.sliding_window)
            kv_in = (cache["k"], cache["v"])

        n_virtual = 0
        if self.soft_prompt is not None and cache is None:
            n_virtual = self.soft_prompt.shape[0]
            x, doc_pos, mask = prepend_soft_prompt(self.soft_prompt[...].astype(dt), x, doc_pos, mask,
                                                   c.sliding_window)
        if c.style == "gpt2":
            x = x + self.pos_embed[...][doc_pos].astype(dt)
        x = dropout(x, c.dropout, None if rng is None else jax.random.fold_in(rng, c.n_layers))
        x = constrain(x, ("batch", "activation_length", "activation_embed"))
        layer_rngs = None if rng is None else jax.random.split(rng, c.n_layers)

        def body(x_btd, block, kv, layer_rng):
            return block(x_btd, doc_pos, mask, kv, start, layer_rng, causal)

        if c.remat != "none":
            body = nnx.remat(body, policy=REMAT_POLICIES[c.remat], prevent_cse=False)
        x, kv_out = nnx.scan(body, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0), unroll=min(c.scan_unroll, c.n_layers))(
            x, self.blocks, kv_in, layer_rngs
        )
        x = self.final_norm(x)
        if cache is None:
            return x[:, n_virtual:], None
        return x, {**cache, "k": kv_out[0], "v": kv_out[1], "index": start + t}

    def skip_left_padding(self, rows_bt: Array, left_pad_b: Array,
                          positions: Array | None = None) -> tuple[Array, Array]:
        """Segment ids (int32: 0 on left padding, 1 elsewhere) and positions for cache rows
        ``rows`` when cache rows ``[n_virtual, n_virtual + left_pad)`` hold each row's left
        padding. Padding attends only to padding (never a fully masked row) and the row's
        tokens only to each other; positions skip the padding (clamped at 0 on it), unless
        given."""
        n_virtual = 0 if self.soft_prompt is None else self.soft_prompt.shape[0]
        pad_b1 = left_pad_b[:, None]
        is_pad = (rows_bt >= n_virtual) & (rows_bt < n_virtual + pad_b1)
        doc_pos = jnp.maximum(rows_bt - pad_b1, 0) if positions is None else positions
        return jnp.where(is_pad, 0, 1).astype(jnp.int32), doc_pos


def prepend_soft_prompt(prompt_nd: Array, x_btd: Array, doc_pos_bt: Array, mask_b1ts: Array,
                        sliding_window: int = 0) -> tuple[Array, Array, Array]:
    """Prepend ``n`` virtual tokens (Lester et al. 2021; PEFT prompt tuning) to every row:
    embeddings (b, n + t, d), positions (b, n + t) and mask (b, 1, n + t, n + t).

    The virtual tokens take positions 0..n-1, attend causally to each other and to nothing
    else; every token of the row sees all of them and its own position moves up by ``n``.
    In a packed row each document therefore runs exactly as ``[prompt; document]`` would
    alone (PEFT prepends per example). ``sliding_window`` limits a token at document
    position ``p`` to virtual tokens ``j`` with ``n + p - j < sliding_window``, as it would
    in that unpacked sequence.
    """
    n, (b, t) = prompt_nd.shape[0], doc_pos_bt.shape
    virt = jnp.arange(n, dtype=jnp.int32)
    shifted_bt = doc_pos_bt + n
    to_virtual_btn = jnp.ones((b, t, n), bool)
    among_virtual_nn = virt[:, None] >= virt[None, :]
    if sliding_window > 0:
        to_virtual_btn = shifted_bt[:, :, None] - virt < sliding_window
        among_virtual_nn = among_virtual_nn & (virt[:, None] - virt[None, :] < sliding_window)
    top = jnp.concatenate([jnp.broadcast_to(among_virtual_nn, (b, 1, n, n)), jnp.zeros((b, 1, n, t), bool)], -1)
    bottom = jnp.concatenate([to_virtual_btn[:, None], mask_b1ts], -1)
    x = jnp.concatenate([jnp.broadcast_to(prompt_nd, (b, n, prompt_nd.shape[1])), x_btd], axis=1)
    positions = jnp.concatenate([jnp.broadcast_to(virt, (b, n)), shifted_bt], axis=1)
    return x, positions, jnp.concatenate([top, bottom], axis=2)
