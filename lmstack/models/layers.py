"""Building blocks shared by every model family: norms, RoPE, attention, MLPs.

Every parameter is created with logical axis names (see ``lmstack.sharding.RULES``) and kept
in float32; layers cast to the compute dtype where they use a weight. Shapes are named in
variables: b batch, t query length, s key length, d model width, n query heads, k key/value
heads, h head width, f MLP width, v vocabulary.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lmstack.sharding import constrain

# Parameters are sharded explicitly by the trainer (init under jit with out_shardings), so
# variables must not try to shard themselves eagerly when created.
nnx.use_eager_sharding(False)

Array = jax.Array


def dense(x: Array, w: Array, out_dtype: jnp.dtype | None = None) -> Array:
    """``x[..., d] @ w[d, *out]`` as one 2-D matmul. Folding the leading dims into one keeps
    XLA:CPU on its GEMM path in the backward pass, where a 3-D dot fused with an elementwise
    producer otherwise runs several times slower."""
    d = x.shape[-1]
    out = w.shape[1:]
    y = jnp.matmul(x.reshape(-1, d), w.reshape(d, -1), preferred_element_type=out_dtype)
    return y.reshape(*x.shape[:-1], *out)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], std: float) -> nnx.Param:
    """A float32 parameter drawn from N(0, std^2), truncated at 2 std, with logical names."""
    init = nnx.initializers.truncated_normal(stddev=std) if std > 0 else nnx.initializers.zeros
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names)


def zeros_param(shape: tuple[int, ...], names: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.float32), out_sharding=names)


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


def rope(x_bthd: Array, positions_bt: Array, theta: float) -> Array:
    """Rotary position embedding (rotate-half form, as in Llama) applied in float32."""
    h = x_bthd.shape[-1]
    freqs = theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)  # (h/2,)
    angles = positions_bt[..., None].astype(jnp.float32) * freqs  # (b, t, h/2)
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x = x_bthd.astype(jnp.float32)
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bthd.dtype)


def attention_mask(
    q_segment_bt: Array, k_segment_bs: Array, q_pos_bt: Array, k_pos_bs: Array, k_valid_bs: Array | None = None
) -> Array:
    """Causal mask that never crosses a document: (b, 1, t, s) booleans.

    Queries attend to keys of the same segment at an earlier or equal position index
    along the packed row. ``q_pos``/``k_pos`` here are indices in the row (or in the KV
    cache), not positions within the document.
    """
    same_doc = q_segment_bt[:, :, None] == k_segment_bs[:, None, :]
    causal = q_pos_bt[:, :, None] >= k_pos_bs[:, None, :]
    mask = same_doc & causal
    if k_valid_bs is not None:
        mask = mask & k_valid_bs[:, None, :]
    return mask[:, None, :, :]


def dot_product_attention(q_btnh: Array, k_bskh: Array, v_bskh: Array, mask_b1ts: Array) -> Array:
    """Grouped-query attention with softmax in float32; k divides n."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(h)
    logits = jnp.where(mask_b1ts[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)
    return out.reshape(b, t, n, h)


class Attention(nnx.Module):
    """Multi-head attention with optional grouped KV heads, RoPE and a KV cache."""

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.q = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg.init_std)
        self.k = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std)
        self.v = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std)
        self.o = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std)
        if cfg.use_bias:
            self.q_bias = zeros_param((n, h), ("heads", "head_dim"))
            self.k_bias = zeros_param((k, h), ("kv_heads", "head_dim"))
            self.v_bias = zeros_param((k, h), ("kv_heads", "head_dim"))
            self.o_bias = zeros_param((d,), ("norm",))
        self.use_bias = cfg.use_bias
        self.use_rope = cfg.style == "llama"
        self.rope_theta = cfg.rope_theta
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_btd: Array, doc_pos_bt: Array, mask_b1ts: Array, kv: tuple[Array, Array] | None,
                 cache_index: Array | None) -> tuple[Array, tuple[Array, Array] | None]:
        dt = self.dtype
        q = dense(x_btd, self.q[...].astype(dt))  # (b, t, n, h)
        k = dense(x_btd, self.k[...].astype(dt))  # (b, t, k, h)
        v = dense(x_btd, self.v[...].astype(dt))
        if self.use_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if self.use_rope:
            q, k = rope(q, doc_pos_bt, self.rope_theta), rope(k, doc_pos_bt, self.rope_theta)
        q = constrain(q, ("batch", "activation_length", "activation_heads", None))
        if kv is not None:  # decoding: write this chunk into the cache, attend to all of it
            k_cache, v_cache = kv
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), cache_index, axis=1)
            kv = (k, v)
        out = dot_product_attention(q, k.astype(dt), v.astype(dt), mask_b1ts)
        b, t, n, h = out.shape
        y = dense(out.reshape(b, t, n * h), self.o[...].astype(dt).reshape(n * h, -1))
        if self.use_bias:
            y = y + self.o_bias[...].astype(dt)
        return y, kv


class MLP(nnx.Module):
    """SwiGLU (llama) or GELU (gpt2) feed-forward block."""

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.gated = cfg.style == "llama"
        if self.gated:
            self.gate = param(rngs, (d, f), ("embed", "mlp"), cfg.init_std)
        self.up = param(rngs, (d, f), ("embed", "mlp"), cfg.init_std)
        self.down = param(rngs, (f, d), ("mlp", "embed"), out_std)
        self.use_bias = cfg.use_bias
        if cfg.use_bias:
            self.up_bias = zeros_param((f,), ("mlp",))
            self.down_bias = zeros_param((d,), ("norm",))
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_btd: Array) -> Array:
        dt = self.dtype
        h = dense(x_btd, self.up[...].astype(dt))
        if self.use_bias:
            h = h + self.up_bias[...].astype(dt)
        if self.gated:
            h = jax.nn.silu(dense(x_btd, self.gate[...].astype(dt))) * h
        else:
            h = jax.nn.gelu(h, approximate=False)
        h = constrain(h, ("batch", "activation_length", "mlp"))
        y = dense(h, self.down[...].astype(dt))
        if self.use_bias:
            y = y + self.down_bias[...].astype(dt)
        return y


def dropout(x: Array, rate: float, rng: Array | None) -> Array:
    """Inverted dropout driven by an explicit key; identity when rate is 0 or rng is None."""
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
