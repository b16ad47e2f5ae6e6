"""The attention core, ``softmax(q k^T / sqrt(h) + bias) v`` over a boolean mask, by one of
the implementations ``model.attention_impl`` names:

- ``xla_einsum`` (default): lmstack's own two einsums with the softmax in float32
  (:func:`dot_product_attention`).
- ``dot_product``: ``jax.nn.dot_product_attention(implementation='xla')`` with the same
  boolean mask (XLA's fused attention on any backend; the softmax in float32 too).
- ``cudnn``: ``jax.nn.dot_product_attention(implementation='cudnn')``, cuDNN's flash
  attention on NVIDIA GPUs (bfloat16 only). Causal attention goes in as ``is_causal`` (and a
  sliding window as ``local_window_size``), so cuDNN skips the blocks above the diagonal;
  anything else the mask says (packed documents, padding, a prefix LM) goes in as the mask,
  which cuDNN adds to the logits as a bias. jax 0.10's public API has no packed-segment
  argument: ``query_seq_lengths`` / ``key_value_seq_lengths`` only describe right padding
  of one sequence per row. A call with a KV cache (decoding) uses the ``dot_product`` path:
  its query block is not aligned with the keys, and one query row gains nothing from flash
  attention.

Grouped-query attention (k key/value heads dividing n query heads) is native to all three.
In bfloat16 the einsum path's backward matmuls all run in bf16 (:func:`einsum_f32`); jax's
XLA implementation differentiates its float32 logits into two float32 x bf16 matmuls (the
query and key gradients).
Shapes: b batch, t queries, s keys, n query heads, k key/value heads, h head width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lmstack.models.mixed_precision import einsum_f32

Array = jax.Array

ATTENTION_IMPLS = ("xla_einsum", "dot_product", "cudnn")
# attention_impl -> jax.nn.dot_product_attention's ``implementation``
JAX_IMPLEMENTATION = {"dot_product": "xla", "cudnn": "cudnn"}
CUDNN_DTYPES = ("bfloat16",)  # of model.dtype's choices; cuDNN flash attention runs in fp16 / bf16 only


def causal_mask(t: int, sliding_window: int = 0) -> Array:
    """(1, 1, t, t) booleans: query i sees keys j <= i (and ``i - j < sliding_window`` when
    it is > 0), as :func:`lmstack.models.layers.attention_mask` for one document per row."""
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    visible = j <= i
    if sliding_window > 0:
        visible = visible & (i - j < sliding_window)
    return visible[None, None]


def dot_product_attention(q_btnh: Array, k_bskh: Array, v_bskh: Array, mask_b1ts: Array,
                          bias_bnts: Array | None = None) -> Array:
    """Grouped-query attention with softmax in float32; k divides n. ``bias`` (batch 1 or b,
    float32) is added to the scaled logits, e.g. a relative position bias."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    s = k_bskh.shape[1]
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    logits = einsum_f32("btkgh,bskh->bkgts", q_btkgh, k_bskh)
    logits = logits / math.sqrt(h)
    if bias_bnts is not None:
        logits = logits + bias_bnts.astype(jnp.float32).reshape(-1, k, n // k, t, s)
    logits = jnp.where(mask_b1ts[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)
    return out.reshape(b, t, n, h)


def attention_core(q_btnh: Array, k_bskh: Array, v_bskh: Array, mask_b1ts: Array | None,
                   bias_bnts: Array | None = None, *, impl: str = "xla_einsum", causal: bool = False,
                   sliding_window: int = 0) -> Array:
    """Attention output (b, t, n, h) in the dtype of ``v``.

    ``mask`` (booleans (b or 1, 1, t, s), True where a query sees a key) is the whole truth
    of who sees whom; None means exactly causal with ``sliding_window`` (t == s, one
    document per row). ``causal`` promises that the mask lets no query see a later key of
    the same row (t == s): a kernel may then skip the blocks above the diagonal
    (``is_causal``). ``bias`` (float32, batch 1 or b) is added to the scaled logits.
    Raises ValueError for an unknown ``impl``.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
    if mask_b1ts is None and not causal:
        raise ValueError("attention_core: mask None means causal attention: pass causal=True")
    if impl == "cudnn":
        window = (sliding_window - 1, 0) if causal and sliding_window > 0 else None
        if bias_bnts is not None:
            bias_bnts = bias_bnts.astype(q_btnh.dtype)  # cuDNN takes the bias in the inputs' dtype
        return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, bias_bnts, mask_b1ts, is_causal=causal,
                                            local_window_size=window, implementation=JAX_IMPLEMENTATION[impl])
    if mask_b1ts is None:
        mask_b1ts = causal_mask(q_btnh.shape[1], sliding_window)
    if impl == "xla_einsum":
        return dot_product_attention(q_btnh, k_bskh, v_bskh, mask_b1ts, bias_bnts)
    return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, bias_bnts, mask_b1ts,
                                        implementation=JAX_IMPLEMENTATION[impl])


def check_attention_impl(impl: str, dtype: str, head_dim: int, family: str) -> None:
    """Raise ValueError when ``model.<family>`` cannot run attention ``impl`` with this
    compute ``dtype`` and ``head_dim`` (cuDNN flash attention: bf16, head width a multiple
    of 8 up to 256 on Hopper, 128 before; jax ``check_is_flash_attention``)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.{family}: attention_impl {impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
    if impl != "cudnn":
        return
    if dtype not in CUDNN_DTYPES:
        raise ValueError(f"model.attention_impl='cudnn' needs model.dtype='bfloat16' (cuDNN flash attention runs "
                         f"in bf16/fp16 only), got {dtype!r}: set --config.model.dtype=bfloat16 or use "
                         f"model.attention_impl=dot_product")
    if head_dim % 8 or head_dim > 256:
        raise ValueError(f"model.attention_impl='cudnn' needs a head width that is a multiple of 8 and at most 256 "
                         f"(128 before Hopper), got head_dim={head_dim}: use model.attention_impl=dot_product")


def attention_platform_problem(impl: str, platform: str) -> str | None:
    """Why ``impl`` cannot run on devices of ``platform`` (``jax.Device.platform``), or None."""
    if impl == "cudnn" and platform != "gpu":
        return (f"model.attention_impl='cudnn' needs a GPU (cuDNN flash attention), but this run's devices are "
                f"{platform}: use --config.model.attention_impl=dot_product (the same attention through XLA)")
    return None
