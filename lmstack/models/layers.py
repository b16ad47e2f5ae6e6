"""Building blocks shared by every model family: norms, RoPE, attention, MLPs.

Every parameter is created with logical axis names (see ``lmstack.sharding.RULES``) and kept
in float32; layers cast to the compute dtype where they use a weight. Shapes are named in
variables: b batch, t query length, s key length, d model width, n query heads, k key/value
heads, h head width, f MLP width, v vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lmstack.models.attention_core import ATTENTION_IMPLS, attention_core, causal_mask
from lmstack.models.dropout import dropout  # noqa: F401 (re-exported)
from lmstack.models.projection import Projection, dense, param, zeros_param  # noqa: F401 (re-exported)
from lmstack.sharding import constrain

# Parameters are sharded explicitly by the trainer (init under jit with out_shardings), so
# variables must not try to shard themselves eagerly when created.
flax.config.update("flax_always_shard_variable", False)  # process-wide (nnx.use_eager_sharding is per thread)

Array = jax.Array


# The config keys every model family has (``config.model``), with their defaults; each family
# adds its own (``config_defaults`` on the registered class). Zeros mean "derive it".
TRANSFORMER_DEFAULTS: dict[str, Any] = dict(
    style="llama",  # llama (RMSNorm, RoPE, SwiGLU) | gpt2 (LayerNorm, learned positions, GELU)
    vocab_size=0,  # 0: the tokenizer's vocabulary plus the ids the objective reserves
    d_model=256,
    n_layers=4,
    n_heads=4,
    n_kv_heads=0,  # 0: same as n_heads (no grouping)
    head_dim=0,  # 0: d_model // n_heads
    d_ff=0,  # 0: 4*d, or the 8/3*d gated width rounded to 64
    max_seq_len=0,  # 0: data.seq_len
    tie_embeddings=True,
    use_bias=False,
    dropout=0.0,
    rope_theta=10000.0,
    norm_eps=1e-5,
    init_std=0.02,
    dtype="float32",  # compute dtype: float32 | bfloat16 (parameters stay float32)
    remat="none",  # none | full | dots | projections (see REMAT_POLICIES)
    attention_impl="xla_einsum",  # xla_einsum | dot_product | cudnn (see lmstack.models.attention_core)
    # Layers per iteration of the layer scan: 1 keeps compile time flat in depth; n_layers
    # unrolls fully, which XLA:CPU runs ~2x faster in the backward pass.
    scan_unroll=1,
)
# Keys that change how a model runs but not what its weights mean: a run started from
# another (init.from) may set them freely.
WEIGHT_FREE_KEYS = ("dropout", "dtype", "remat", "scan_unroll", "init_std", "classifier_pooling", "attention_impl")
TRANSFORMER_CHOICES = {"style": ("llama", "gpt2"), "dtype": ("float32", "bfloat16"),
                       "remat": ("none", "full", "dots", "projections"), "attention_impl": ATTENTION_IMPLS}


class RMSNorm(nnx.Module):
    def __init__(self, d: int, eps: float):
        self.scale = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=("norm",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, d: int, eps: float, use_bias: bool):
        self.scale = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=("norm",))
        self.bias = zeros_param((d,), ("norm",)) if use_bias else None
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)


NORMS = ("rmsnorm", "layernorm")


def make_norm(kind: str, d: int, eps: float, use_bias: bool) -> RMSNorm | LayerNorm:
    """``rmsnorm`` (Llama, T5) or ``layernorm`` (GPT-2, BERT; with a bias if ``use_bias``)."""
    if kind == "rmsnorm":
        return RMSNorm(d, eps)
    if kind == "layernorm":
        return LayerNorm(d, eps, use_bias)
    raise ValueError(f"norm {kind!r} is not one of {', '.join(NORMS)}")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's ``rope_scaling`` of type ``llama3`` (HF names and Meta's defaults)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def rope_inv_freq(head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None) -> Array:
    """RoPE inverse frequencies ``theta^(-2i/h)``, (h/2,) float32.

    With ``scaling`` (Llama 3.1, HF ``_compute_llama3_parameters``): wavelengths longer than
    ``original_max_position_embeddings / low_freq_factor`` are stretched by ``factor``,
    those shorter than ``original / high_freq_factor`` are kept, and the band between
    interpolates linearly in ``original / wavelength``.
    """
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling is None:
        return inv_freq
    s = scaling
    wavelen = 2 * math.pi / inv_freq
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    smooth = jnp.clip(smooth, 0.0, 1.0)  # 0 beyond the low-frequency wavelength, 1 below the high-frequency one
    return (1 - smooth) * inv_freq / s.factor + smooth * inv_freq


def rope(x_bthd: Array, positions_bt: Array, theta: float, scaling: Llama3RopeScaling | None = None) -> Array:
    """Rotary position embedding (rotate-half form, as in Llama) applied in float32."""
    h = x_bthd.shape[-1]
    freqs = rope_inv_freq(h, theta, scaling)  # (h/2,)
    angles = positions_bt[..., None].astype(jnp.float32) * freqs  # (b, t, h/2)
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x = x_bthd.astype(jnp.float32)
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bthd.dtype)


def segment_mask(q_segment_bt: Array, k_segment_bs: Array) -> Array:
    """Bidirectional mask that never crosses a document: (b, 1, t, s) booleans.

    Used for encoder self-attention and for cross-attention (decoder segment ids against
    encoder segment ids). Padding (segment 0) only meets padding, so a real token never
    attends to it, and a padding row is never fully masked (no NaNs).
    """
    return (q_segment_bt[:, :, None] == k_segment_bs[:, None, :])[:, None, :, :]


def attention_mask(
    q_segment_bt: Array,
    k_segment_bs: Array,
    q_pos_bt: Array,
    k_pos_bs: Array,
    k_valid_bs: Array | None = None,
    *,
    q_prefix_bt: Array | None = None,
    k_prefix_bs: Array | None = None,
    sliding_window: int = 0,
) -> Array:
    """Causal mask that never crosses a document: (b, 1, t, s) booleans.

    Queries attend to keys of the same segment at an earlier or equal position index
    along the packed row. ``q_pos``/``k_pos`` here are indices in the row (or in the KV
    cache), not positions within the document.

    Prefix LM: where ``q_prefix`` and ``k_prefix`` (booleans, True on each document's
    prefix tokens) are both true, a query also sees later keys of its document, so the
    prefix attends to itself bidirectionally while everything after it stays causal.

    ``sliding_window`` > 0 (Mistral): a query sees only keys with ``q_pos - k_pos <
    sliding_window``, as HF ``sliding_window_overlay`` (the query itself and the window - 1
    keys before it).
    """
    same_doc = q_segment_bt[:, :, None] == k_segment_bs[:, None, :]
    visible = q_pos_bt[:, :, None] >= k_pos_bs[:, None, :]
    if q_prefix_bt is not None and k_prefix_bs is not None:
        visible = visible | (q_prefix_bt.astype(bool)[:, :, None] & k_prefix_bs.astype(bool)[:, None, :])
    if sliding_window > 0:
        visible = visible & (q_pos_bt[:, :, None] - k_pos_bs[:, None, :] < sliding_window)
    mask = same_doc & visible
    if k_valid_bs is not None:
        mask = mask & k_valid_bs[:, None, :]
    return mask[:, None, :, :]


def relative_position_bucket(relative_position: Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """T5's bucketing of ``relative_position = key_position - query_position`` (int32).

    Bidirectional: keys before the query use buckets [0, n/2), keys after it [n/2, n).
    Causal: keys before the query use all n buckets and keys after it share bucket 0.
    Within a direction of m buckets, distances 0..m/2-1 have a bucket each; larger ones
    share buckets spaced logarithmically up to ``max_distance``, and farther ones the
    last bucket. Computed in float32 as in Mesh TensorFlow and HF Transformers.
    """
    rel = relative_position.astype(jnp.int32)
    n = num_buckets
    if bidirectional:
        n //= 2
        offset = (rel > 0).astype(jnp.int32) * n
        rel = jnp.abs(rel)
    else:
        offset = jnp.zeros_like(rel)
        rel = jnp.maximum(-rel, 0)
    max_exact = n // 2
    # the log is taken of at least max_exact: smaller distances use the exact branch anyway
    far = jnp.maximum(rel, max_exact).astype(jnp.float32)
    log_ratio = jnp.log(far / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (n - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, n - 1)
    return offset + jnp.where(rel < max_exact, rel, large)


class RelativePositionBias(nnx.Module):
    """T5's learned per-head attention bias over bucketed relative positions.

    One table serves every layer of a stack (as in T5), so the bias is computed once per
    forward pass and handed to each layer's attention.
    """

    def __init__(self, n_heads: int, *, num_buckets: int, max_distance: int, bidirectional: bool,
                 init_std: float, rngs: nnx.Rngs):
        self.table = param(rngs, (num_buckets, n_heads), ("relpos_buckets", "heads"), init_std)
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional

    def __call__(self, q_pos_bt: Array, k_pos_bs: Array) -> Array:
        """(b, n, t, s) float32 bias from positions within each document."""
        rel_bts = k_pos_bs[:, None, :] - q_pos_bt[:, :, None]
        buckets = relative_position_bucket(rel_bts, bidirectional=self.bidirectional,
                                           num_buckets=self.num_buckets, max_distance=self.max_distance)
        bias_btsn = self.table[...][buckets]
        return constrain(jnp.transpose(bias_btsn, (0, 3, 1, 2)), ("batch", "activation_heads", None, None))


class Attention(nnx.Module):
    """Multi-head attention with optional grouped KV heads, RoPE and a KV cache.

    ``use_rope`` (default: ``cfg.style == 'llama'``) and ``out_std`` (the output
    projection's init; default ``init_std / sqrt(2 * cfg.n_layers)``) let families without
    ``style`` / ``n_layers`` (encoder, encoder-decoder) choose them. Cross-attention is
    this module called with ``context_bsd``: keys and values come from the context.

    Biases: ``cfg.use_bias`` puts one on every projection (GPT-2, BERT); ``qkv_bias`` on the
    query, key and value projections only (Qwen2). ``rope_scaling`` rescales the RoPE
    frequencies (Llama 3.1). ``sliding_window`` is the window a causal caller's mask holds
    (Mistral; 0: none), which the core needs where the mask is left out (``mask`` None).

    The core runs by ``cfg.attention_impl`` (:mod:`lmstack.models.attention_core`). The
    projection outputs and the attention output carry :data:`PROJECTION_CHECKPOINTS` names
    (``jax.ad_checkpoint.checkpoint_name``) for the ``projections`` remat policy.
    """

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs, use_rope: bool | None = None, out_std: float | None = None,
                 qkv_bias: bool = False, rope_scaling: Llama3RopeScaling | None = None, sliding_window: int = 0):
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        if out_std is None:
            out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        qkv_bias = cfg.use_bias or qkv_bias
        proj = dict(rngs=rngs, dtype=cfg.dtype)
        self.q = Projection((d,), (n, h), ("embed", "heads", "head_dim"), std=cfg.init_std, bias=qkv_bias, **proj)
        self.k = Projection((d,), (k, h), ("embed", "kv_heads", "head_dim"), std=cfg.init_std, bias=qkv_bias, **proj)
        self.v = Projection((d,), (k, h), ("embed", "kv_heads", "head_dim"), std=cfg.init_std, bias=qkv_bias, **proj)
        self.o = Projection((n, h), (d,), ("heads", "head_dim", "embed"), std=out_std, bias=cfg.use_bias,
                            bias_names=("norm",), **proj)
        self.use_rope = cfg.style == "llama" if use_rope is None else use_rope
        self.rope_theta = cfg.rope_theta
        self.rope_scaling = rope_scaling
        self.dtype = jnp.dtype(cfg.dtype)
        self.attention_impl = cfg.attention_impl
        self.sliding_window = sliding_window
        # (n_virtual, k, h) keys and values every query also sees, set by lmstack.peft.prefix_tuning
        self.prefix_k: nnx.Param | None = nnx.data(None)
        self.prefix_v: nnx.Param | None = nnx.data(None)

    def __call__(self, x_btd: Array, doc_pos_bt: Array, mask_b1ts: Array | None, kv: tuple[Array, Array] | None,
                 cache_index: Array | None, *, context_bsd: Array | None = None,
                 bias_bnts: Array | None = None, rng: Array | None = None,
                 causal: bool = False) -> tuple[Array, tuple[Array, Array] | None]:
        """Attend from ``x`` to itself, or to ``context`` (cross-attention: no RoPE, no cache).
        ``bias`` is an additive float32 logit bias (relative positions); ``rng`` feeds the
        projections' adapter dropout (None: deterministic). ``causal``: the mask never lets a
        query see a later key of its row; ``mask`` None: exactly causal within
        ``sliding_window`` (see :func:`~lmstack.models.attention_core.attention_core`)."""
        dt = self.dtype
        src_bsd = x_btd if context_bsd is None else context_bsd
        if context_bsd is not None and (self.use_rope or kv is not None):
            raise ValueError("cross-attention (context_bsd) takes no RoPE and no KV cache: "
                             "build it with use_rope=False and call it without kv")
        rq, rk, rv, ro = (None,) * 4 if rng is None else jax.random.split(rng, 4)
        q = checkpoint_name(self.q(x_btd, rng=rq), "query_proj")  # (b, t, n, h)
        k = checkpoint_name(self.k(src_bsd, rng=rk), "key_proj")  # (b, s, k, h)
        v = checkpoint_name(self.v(src_bsd, rng=rv), "value_proj")
        if self.use_rope:
            q = rope(q, doc_pos_bt, self.rope_theta, self.rope_scaling)
            k = rope(k, doc_pos_bt, self.rope_theta, self.rope_scaling)
        q = constrain(q, ("batch", "activation_length", "activation_heads", None))
        impl = self.attention_impl
        if kv is not None:  # decoding: write this chunk into the cache, attend to all of it
            k_cache, v_cache = kv
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), cache_index, axis=1)
            kv = (k, v)
            causal = False  # the cache's keys are not aligned with this chunk's queries
            impl = "dot_product" if impl == "cudnn" else impl
        if self.prefix_k is not None and context_bsd is None:
            if mask_b1ts is None:
                mask_b1ts = causal_mask(x_btd.shape[1], self.sliding_window)
            k, v, mask_b1ts, bias_bnts = self.prepend_prefix(k, v, mask_b1ts, bias_bnts)
            causal = False  # every query sees the prefix keys in front of the row
        out = attention_core(q, k.astype(dt), v.astype(dt), mask_b1ts, bias_bnts, impl=impl, causal=causal,
                             sliding_window=self.sliding_window)
        out = checkpoint_name(out, "context")
        y = checkpoint_name(self.o(out, rng=ro), "out_proj")
        return y, kv

    def prepend_prefix(self, k_bskh: Array, v_bskh: Array, mask_b1ts: Array,
                       bias_bnts: Array | None) -> tuple[Array, Array, Array, Array | None]:
        """Prefix tuning (Li & Liang 2021; PEFT prefix tuning): the learned ``prefix_k`` /
        ``prefix_v`` (n, k, h) go before the keys and values of every row, visible to every
        query, with a zero bias. They are used as given, like the (already rotated) cache
        entries HF receives as ``past_key_values``; the queries keep their own positions."""
        b = k_bskh.shape[0]
        n = self.prefix_k.shape[0]
        pk = jnp.broadcast_to(self.prefix_k[...].astype(k_bskh.dtype), (b,) + self.prefix_k.shape)
        pv = jnp.broadcast_to(self.prefix_v[...].astype(v_bskh.dtype), (b,) + self.prefix_v.shape)
        mask = jnp.concatenate([jnp.ones(mask_b1ts.shape[:3] + (n,), bool), mask_b1ts], axis=-1)
        if bias_bnts is not None:
            bias_bnts = jnp.pad(bias_bnts, ((0, 0), (0, 0), (0, 0), (n, 0)))
        return jnp.concatenate([pk, k_bskh], axis=1), jnp.concatenate([pv, v_bskh], axis=1), mask, bias_bnts


def _gelu_exact(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


# name -> (nonlinearity, gated). swiglu: Llama; geglu: T5 v1.1's gated-gelu (tanh form);
# gelu: BERT (exact erf form, as nanoGPT and the gpt2 decoder's default use); gelu_tanh: OpenAI
# GPT-2 (HF ``gelu_new``, the tanh approximation); relu: original T5.
ACTIVATIONS: dict[str, tuple[Callable[[Array], Array], bool]] = {
    "swiglu": (jax.nn.silu, True),
    "geglu": (_gelu_tanh, True),
    "gelu": (_gelu_exact, False),
    "relu": (jax.nn.relu, False),
    "gelu_tanh": (_gelu_tanh, False),
}


class MLP(nnx.Module):
    """Feed-forward block: SwiGLU (llama) or GELU (gpt2) by ``cfg.style``, or any of
    :data:`ACTIVATIONS` by ``activation``. ``out_std`` as in :class:`Attention`."""

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs, activation: str | None = None, out_std: float | None = None):
        d, f = cfg.d_model, cfg.d_ff
        if out_std is None:
            out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        if activation is None:
            activation = "swiglu" if cfg.style == "llama" else "gelu"
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        self.act, self.gated = ACTIVATIONS[activation]
        proj = dict(rngs=rngs, dtype=cfg.dtype)
        if self.gated:
            self.gate = Projection((d,), (f,), ("embed", "mlp"), std=cfg.init_std, **proj)
        self.up = Projection((d,), (f,), ("embed", "mlp"), std=cfg.init_std, bias=cfg.use_bias, **proj)
        self.down = Projection((f,), (d,), ("mlp", "embed"), std=out_std, bias=cfg.use_bias, bias_names=("norm",),
                               **proj)

    def __call__(self, x_btd: Array, rng: Array | None = None) -> Array:
        r_gate, r_up, r_down = (None,) * 3 if rng is None else jax.random.split(rng, 3)
        h = checkpoint_name(self.up(x_btd, rng=r_up), "mlp_up")
        if self.gated:
            h = self.act(checkpoint_name(self.gate(x_btd, rng=r_gate), "mlp_gate")) * h
        else:
            h = self.act(h)
        h = constrain(h, ("batch", "activation_length", "mlp"))
        return checkpoint_name(self.down(h, rng=r_down), "mlp_down")


POOLINGS = ("mean", "cls", "last")


def pool(hidden_btd: Array, segment_ids_bt: Array | None, kind: str) -> Array:
    """One float32 vector per row (b, d) from a row holding one sequence (padding: segment 0).

    ``mean``: average over non-padding tokens; ``cls``: the first token; ``last``: the last
    non-padding token (the usual choice for a causal decoder).
    """
    x = hidden_btd.astype(jnp.float32)
    b, t, _ = x.shape
    valid_bt = jnp.ones((b, t), bool) if segment_ids_bt is None else segment_ids_bt != 0
    if kind == "mean":
        w = valid_bt.astype(jnp.float32)[..., None]
        return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    if kind == "cls":
        return x[:, 0]
    if kind == "last":
        last_b = jnp.max(jnp.where(valid_bt, jnp.arange(t, dtype=jnp.int32), 0), axis=1)
        return jnp.take_along_axis(x, last_b[:, None, None], axis=1)[:, 0]
    raise ValueError(f"pooling {kind!r} is not one of {', '.join(POOLINGS)}")


# The names Attention and MLP give their matmul outputs (MaxText's names for the attention ones).
PROJECTION_CHECKPOINTS = ("query_proj", "key_proj", "value_proj", "context", "out_proj", "mlp_gate", "mlp_up",
                          "mlp_down")
# model.remat -> what a block keeps for the backward pass (none: everything, no rematerialisation).
# full: only the block's input, the whole block runs again. dots: every matmul without batch
# dimensions, i.e. the projections (``dense`` folds them into 2-D matmuls; LoRA's inner
# products too), not the attention einsums. projections: the named projection outputs and
# the attention output (PROJECTION_CHECKPOINTS): norms, RoPE and activations are recomputed,
# and the attention core again for the residuals its own backward needs (the probabilities;
# cuDNN's log-sum-exp), but no projection is.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "projections": jax.checkpoint_policies.save_only_these_names(*PROJECTION_CHECKPOINTS),
}
