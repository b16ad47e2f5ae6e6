"""The k1/k2/k3 KL estimators: formulas, zero-at-equality, and unbiasedness by Monte Carlo."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmstack.config import ConfigError
from lmstack.rl.kl import kl_estimate


def test_each_estimator_matches_numpy():
    rng = np.random.default_rng(0)
    logp, ref = (np.log(rng.uniform(0.01, 1, size=(3, 7))).astype(np.float32) for _ in range(2))
    d = logp.astype(np.float64) - ref
    expected = {"k1": d, "k2": 0.5 * d ** 2, "k3": np.exp(-d) - (-d) - 1}
    for kind, ref_value in expected.items():
        assert kl_estimate(jnp.asarray(logp, jnp.bfloat16), ref, kind).dtype == jnp.float32
        np.testing.assert_allclose(kl_estimate(logp, ref, kind), ref_value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["k2", "k3"])
def test_zero_with_zero_gradient_when_policy_equals_reference(kind):
    logp = jnp.log(jnp.array([[0.1, 0.5, 0.9], [0.3, 0.02, 0.7]]))
    assert np.all(np.asarray(kl_estimate(logp, logp, kind)) == 0.0)
    grad = jax.grad(lambda lp: kl_estimate(lp, logp, kind).sum())(logp)
    assert np.all(np.asarray(grad) == 0.0)


def test_k1_and_k3_are_unbiased_k2_is_not():
    """Tokens sampled from q: the sample means of k1 and k3 estimate KL(q || p); k2's estimates
    E_q[0.5 log(q/p)^2] instead. 200k samples; each mean is checked to 5 standard errors (a
    correct estimator fails that with probability ~6e-7; the seed is fixed)."""
    rng = np.random.default_rng(0)
    q = np.exp(lq := rng.normal(size=6)) / np.exp(lq).sum()
    p = np.exp(lp := rng.normal(size=6)) / np.exp(lp).sum()
    log_ratio = np.log(q) - np.log(p)
    exact = {"k1": (q * log_ratio).sum(), "k3": (q * log_ratio).sum(), "k2": (q * 0.5 * log_ratio ** 2).sum()}
    x = rng.choice(6, size=200_000, p=q)
    for kind, target in exact.items():
        samples = np.asarray(kl_estimate(np.log(q)[x], np.log(p)[x], kind), np.float64)
        se = samples.std() / np.sqrt(samples.size)
        assert abs(samples.mean() - target) < 5 * se, (kind, samples.mean(), target, se)
    k2 = np.asarray(kl_estimate(np.log(q)[x], np.log(p)[x], "k2"), np.float64)
    assert abs(k2.mean() - exact["k1"]) > 5 * k2.std() / np.sqrt(k2.size)


def test_unknown_estimator_is_refused():
    with pytest.raises(ConfigError) as e:
        kl_estimate(jnp.zeros(2), jnp.zeros(2), "low_var_kl")
    assert str(e.value) == "objective.kl_estimator='low_var_kl': unknown; choose one of k1, k2, k3"
