"""The q/k row permutation: round trips, and that it turns rotate-half RoPE into llama.cpp's
interleaved RoPE (the reason convert_hf_to_gguf.py applies it)."""

import numpy as np
import pytest

from lmstack.interop.qk import permute, unpermute
from tests.numpy_llama import rope


@pytest.mark.parametrize("n_head", [4, 1], ids=["q_4_heads", "k_1_kv_head"])
def test_unpermute_inverts_permute(n_head):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_head * 8, 12))
    bias = rng.standard_normal(n_head * 8)
    assert not np.array_equal(permute(w, n_head), w)
    np.testing.assert_array_equal(unpermute(permute(w, n_head), n_head), w)
    np.testing.assert_array_equal(permute(unpermute(w, n_head), n_head), w)
    np.testing.assert_array_equal(unpermute(permute(bias, n_head), n_head), bias)


def test_permute_row_order_is_llama_cpp():
    """One head of width 6: rows (0 1 2 | 3 4 5) pair as (0,3) (1,4) (2,5) and become adjacent."""
    rows = np.arange(6)
    np.testing.assert_array_equal(permute(rows, 1), [0, 3, 1, 4, 2, 5])
    np.testing.assert_array_equal(permute(np.arange(12), 2), [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11])


def test_permuted_weights_with_interleaved_rope_equal_rotate_half():
    rng = np.random.default_rng(1)
    n_heads, n_kv_heads, h, d, t = 6, 2, 8, 16, 11
    x = rng.standard_normal((t, d))
    for n in (n_heads, n_kv_heads):
        w = rng.standard_normal((n * h, d))  # HF (out, in), rotate-half row order
        half = rope((x @ w.T).reshape(t, n, h), 1000.0, interleaved=False)
        inter = rope((x @ permute(w, n).T).reshape(t, n, h), 1000.0, interleaved=True)
        # the rotated vectors are the same up to the row order, so every q.k score is unchanged
        np.testing.assert_allclose(unpermute(inter.reshape(t, n * h).T, n).T, half.reshape(t, n * h), atol=1e-12)
    wq, wk = rng.standard_normal((n_heads * h, d)), rng.standard_normal((n_kv_heads * h, d))
    group = n_heads // n_kv_heads

    def scores(wq, wk, interleaved):
        q = rope((x @ wq.T).reshape(t, n_heads, h), 1000.0, interleaved)
        k = np.repeat(rope((x @ wk.T).reshape(t, n_kv_heads, h), 1000.0, interleaved), group, axis=1)
        return np.einsum("tnh,snh->nts", q, k)

    np.testing.assert_allclose(scores(permute(wq, n_heads), permute(wk, n_kv_heads), True),
                               scores(wq, wk, False), atol=1e-10)
    assert not np.allclose(scores(wq, wk, True), scores(wq, wk, False), atol=1e-3)  # the order matters


def test_heads_of_odd_width_are_refused():
    with pytest.raises(ValueError, match="10 q/k rows do not split into 2 heads of even width"):
        permute(np.zeros((10, 4)), 2)
