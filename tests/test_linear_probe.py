"""The linear probe's logistic regression separates what is separable, and reads SST-2."""

import numpy as np
import pytest

from lmstack.evals.linear_probe import fit_logistic_regression, read_tsv


def test_logistic_regression_fits_a_separable_problem():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 6)).astype(np.float32)
    true_w = rng.standard_normal((6, 3))
    y = np.argmax(x @ true_w, axis=1)
    w = fit_logistic_regression(x, y, 3, l2=1e-4, steps=100)
    pred = np.argmax(np.concatenate([x, np.ones((400, 1))], 1) @ w, axis=1)
    assert np.mean(pred == y) > 0.95
    # labels unrelated to the features: no better than chance on fresh data
    y_noise = rng.integers(0, 3, 400)
    w = fit_logistic_regression(x, y_noise, 3, l2=1e-1, steps=100)
    x_new = rng.standard_normal((2000, 6)).astype(np.float32)
    acc = np.mean(np.argmax(np.concatenate([x_new, np.ones((2000, 1))], 1) @ w, 1) == rng.integers(0, 3, 2000))
    assert acc < 0.4


@pytest.mark.shared_data
def test_reads_sst2(shared_data):
    texts, labels = read_tsv(shared_data / "sst2" / "dev.tsv")
    assert len(texts) == 872 and set(labels) == {0, 1}
    texts, labels = read_tsv(shared_data / "sst2" / "train.tsv")
    assert len(texts) == 67349 and not any(t.endswith("\r") for t in texts)


@pytest.mark.parametrize("family", ["decoder", "encoder", "encoder_decoder", "two_tower"])
def test_every_family_gives_pooled_features(family):
    """features(tokens, segment_ids): one vector per row that ignores padding."""
    import jax.numpy as jnp

    from lmstack.trainstate import model_factory
    from tests.helpers import tiny_config

    cfg = tiny_config()
    cfg.model.name = family
    make_model, _ = model_factory(cfg, vocab_size=256)
    model = make_model()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 10)), jnp.int32)
    seg = jnp.asarray([[1] * 10, [1] * 6 + [0] * 4, [1] * 6 + [0] * 4], jnp.int32)
    padded = tokens.at[2, 6:].set(7)  # only the padding differs between rows 1 and 2
    f = model.features(padded.at[1].set(tokens[1]), seg)
    assert f.shape == (3, 64) and f.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(f[1]), np.asarray(model.features(tokens[1:2, :6], seg[1:2, :6])[0]),
                               atol=1e-5)
