"""Contrastive losses against straightforward numpy references."""

import jax.numpy as jnp
import numpy as np
import pytest

from lmstack.objectives.contrastive import infonce_loss, sigmoid_loss


def _norm(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def ref_infonce(a, b, scale, negatives=None):
    a, b = _norm(a), _norm(b)
    cand = b if negatives is None else np.concatenate([b, _norm(negatives)])
    n = len(a)
    ab = -_log_softmax(scale * a @ cand.T)[np.arange(n), np.arange(n)]
    ba = -_log_softmax(scale * b @ a.T)[np.arange(n), np.arange(n)]
    return 0.5 * (ab.mean() + ba.mean())


def ref_sigmoid(a, b, scale, bias, negatives=None):
    a, b = _norm(a), _norm(b)
    cand = b if negatives is None else np.concatenate([b, _norm(negatives)])
    z = scale * a @ cand.T + bias
    y = 2 * np.eye(len(a), len(cand)) - 1
    return np.sum(np.log1p(np.exp(-y * z))) / len(a)


@pytest.fixture
def emb():
    rng = np.random.default_rng(0)
    return rng.standard_normal((6, 5)), rng.standard_normal((6, 5)), rng.standard_normal((12, 5))


@pytest.mark.parametrize("with_negatives", [False, True])
def test_infonce_matches_reference(emb, with_negatives):
    a, b, neg = emb
    neg = neg if with_negatives else None
    valid = jnp.ones(6, bool)
    got, _ = infonce_loss(jnp.asarray(a), jnp.asarray(b), jnp.log(1 / 0.07), valid,
                          None if neg is None else jnp.asarray(neg))
    np.testing.assert_allclose(float(got), ref_infonce(a, b, 1 / 0.07, neg), rtol=1e-5)


def test_infonce_scale_is_clipped_at_100(emb):
    a, b, _ = emb
    valid = jnp.ones(6, bool)
    at_cap, _ = infonce_loss(jnp.asarray(a), jnp.asarray(b), jnp.log(100.0), valid)
    above, _ = infonce_loss(jnp.asarray(a), jnp.asarray(b), jnp.log(1000.0), valid)
    np.testing.assert_allclose(float(above), float(at_cap), rtol=1e-6)
    np.testing.assert_allclose(float(above), ref_infonce(a, b, 100.0), rtol=1e-5)


@pytest.mark.parametrize("with_negatives", [False, True])
def test_sigmoid_matches_reference(emb, with_negatives):
    a, b, neg = emb
    neg = neg if with_negatives else None
    got, _ = sigmoid_loss(jnp.asarray(a), jnp.asarray(b), jnp.log(10.0), -10.0, jnp.ones(6, bool),
                          None if neg is None else jnp.asarray(neg))
    np.testing.assert_allclose(float(got), ref_sigmoid(a, b, 10.0, -10.0, neg), rtol=1e-5)


@pytest.mark.parametrize("loss", ["infonce", "sigmoid"])
def test_padding_rows_take_no_part(emb, loss):
    a, b, _ = emb
    pad_a = np.concatenate([a[:4], np.zeros((2, 5)) + 1.0])  # rows 4, 5 are padding
    pad_b = np.concatenate([b[:4], np.zeros((2, 5)) - 1.0])
    valid = jnp.asarray([True] * 4 + [False] * 2)
    if loss == "infonce":
        got, _ = infonce_loss(jnp.asarray(pad_a), jnp.asarray(pad_b), jnp.log(1 / 0.07), valid)
        ref = ref_infonce(a[:4], b[:4], 1 / 0.07)
    else:
        got, _ = sigmoid_loss(jnp.asarray(pad_a), jnp.asarray(pad_b), jnp.log(10.0), -10.0, valid)
        ref = ref_sigmoid(a[:4], b[:4], 10.0, -10.0)
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
