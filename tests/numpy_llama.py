"""A numpy reference forward pass of a Llama-style decoder, for parity tests.

Written from the published formulas (Llama: RMSNorm, RoPE, grouped-query causal
attention, SwiGLU) and kept independent of lmstack. Weights are a dict named and laid out
as in a GGUF file (``token_embd.weight`` ``(V, d)``, ``blk.{i}.attn_q.weight``
``(n*h, d)``, ... every matrix ``(out, in)`` like HF ``nn.Linear``); ``output.weight``
absent means tied embeddings. Computed in float64.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x_tnh: np.ndarray, theta: float, interleaved: bool) -> np.ndarray:
    """Rotate each head's pairs by position * theta^(-2i/h): pairs (i, i + h/2) in the
    rotate-half form (HF Llama), pairs (2i, 2i + 1) in the interleaved form (llama.cpp, GPT-J)."""
    t, _, h = x_tnh.shape
    angles = np.arange(t)[:, None] * theta ** (-np.arange(0, h, 2) / h)  # (t, h/2)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    a, b = (x_tnh[..., 0::2], x_tnh[..., 1::2]) if interleaved else (x_tnh[..., : h // 2], x_tnh[..., h // 2 :])
    ra, rb = a * cos - b * sin, b * cos + a * sin
    out = np.empty_like(x_tnh)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., : h // 2], out[..., h // 2 :] = ra, rb
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(x_td: np.ndarray, w: dict, i: int, n_heads: int, n_kv_heads: int, theta: float,
              interleaved: bool) -> np.ndarray:
    t, _ = x_td.shape
    wq, wk, wv, wo = (w[f"blk.{i}.attn_{n}.weight"].astype(np.float64) for n in ("q", "k", "v", "output"))
    h = wq.shape[0] // n_heads
    q = rope((x_td @ wq.T).reshape(t, n_heads, h), theta, interleaved)
    k = rope((x_td @ wk.T).reshape(t, n_kv_heads, h), theta, interleaved)
    v = (x_td @ wv.T).reshape(t, n_kv_heads, h)
    group = n_heads // n_kv_heads  # query head j reads key/value head j // group
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("tnh,snh->nts", q, k) / np.sqrt(h)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    out = np.einsum("nts,snh->tnh", softmax(scores), v).reshape(t, n_heads * h)
    return out @ wo.T


def swiglu(x_td: np.ndarray, w: dict, i: int) -> np.ndarray:
    gate, up, down = (w[f"blk.{i}.ffn_{n}.weight"].astype(np.float64) for n in ("gate", "up", "down"))
    g = x_td @ gate.T
    return (g / (1 + np.exp(-g)) * (x_td @ up.T)) @ down.T


def forward(w: dict[str, np.ndarray], tokens: np.ndarray, *, n_layers: int, n_heads: int, n_kv_heads: int,
            rope_theta: float, norm_eps: float, interleaved_rope: bool = False) -> np.ndarray:
    """Logits ``(t, V)`` (float64) for one sequence of token ids ``(t,)``.

    ``interleaved_rope=True`` reads q/k rows in llama.cpp's order (a GGUF file as stored);
    False reads them in HF's rotate-half order.
    """
    x = w["token_embd.weight"][tokens].astype(np.float64)
    for i in range(n_layers):
        x = x + attention(rms_norm(x, w[f"blk.{i}.attn_norm.weight"], norm_eps), w, i, n_heads, n_kv_heads,
                          rope_theta, interleaved_rope)
        x = x + swiglu(rms_norm(x, w[f"blk.{i}.ffn_norm.weight"], norm_eps), w, i)
    x = rms_norm(x, w["output_norm.weight"], norm_eps)
    head = w.get("output.weight", w["token_embd.weight"]).astype(np.float64)
    return x @ head.T
