"""sequence_logps against a numpy log-softmax gather."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmstack.preference.logps import sequence_logps


def numpy_sequence_logps(logits, labels, mask):
    """Sum over masked positions of log_softmax(logits)[label], in float64."""
    x = np.asarray(logits, np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    b, t, _ = x.shape
    sums = np.zeros(b)
    for i in range(b):
        for j in range(t):
            if mask[i, j]:
                sums[i] += logp[i, j, labels[i, j]]
    return sums, np.asarray(mask, np.float64).sum(-1)


def _inputs(dtype):
    rng = np.random.default_rng(0)
    b, t, v = 3, 7, 11
    logits = (rng.normal(size=(b, t, v)) * 3).astype(np.float32)
    labels = rng.integers(0, v, size=(b, t)).astype(np.int32)
    mask = rng.random((b, t)) < 0.6
    mask[0, :] = False  # a row with no completion tokens sums to 0
    mask[1, 2] = True
    labels = np.where(mask, labels, -100)  # TRL's pad label under the mask must not leak
    return jnp.asarray(logits, dtype), labels, mask


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sequence_logps_matches_numpy_log_softmax_gather(dtype):
    logits, labels, mask = _inputs(dtype)
    sums, lengths = jax.jit(sequence_logps)(logits, labels, mask)
    want_sums, want_lengths = numpy_sequence_logps(np.asarray(logits.astype(jnp.float32)), labels, mask)
    assert sums.dtype == jnp.float32 and lengths.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(sums), want_sums, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(lengths), want_lengths)
    assert want_sums[0] == 0 and want_lengths[0] == 0


def test_sequence_logps_int_mask_equals_bool_mask():
    logits, labels, mask = _inputs(jnp.float32)
    a = sequence_logps(logits, labels, mask)
    b = sequence_logps(logits, labels, mask.astype(np.int32))
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))

