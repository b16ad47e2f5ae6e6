"""The query/key row order of GGUF files, and back.

HF Llama checkpoints (and lmstack) apply RoPE in the rotate-half form: within a head of
width ``h``, element ``i`` is rotated together with element ``i + h/2``. llama.cpp rotates
adjacent pairs ``(2i, 2i+1)`` (GPT-J style), so ``convert_hf_to_gguf.py`` reorders the rows
of ``q_proj`` / ``k_proj`` (weights and biases) per head with its ``permute``: row
``j*h/2 + i`` moves to ``2i + j``. Attention scores are unchanged because queries and keys
get the same reordering. Both directions are written here once; every reader and writer
of GGUF uses them.
"""

from __future__ import annotations

import numpy as np


def _check(w: np.ndarray, n_head: int) -> int:
    rows = w.shape[0]
    if rows % n_head or (rows // n_head) % 2:
        raise ValueError(f"{rows} q/k rows do not split into {n_head} heads of even width")
    return rows // n_head // 2


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved-pair order.

    ``w``: ``(n_head * head_dim, ...)`` (a weight ``(out, in)`` or a bias ``(out,)``).
    Pass ``n_head`` (``llama.attention.head_count``) for ``attn_q`` and ``n_head_kv``
    (``llama.attention.head_count_kv``) for ``attn_k``. Same as llama.cpp
    ``convert_hf_to_gguf.py`` ``LlamaModel.permute``. Raises ValueError if the rows do
    not split into heads of even width.
    """
    half = _check(w, n_head)
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute`: llama.cpp interleaved-pair rows -> HF rotate-half rows."""
    half = _check(w, n_head)
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
