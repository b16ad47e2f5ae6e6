"""Bradley-Terry reward-model loss against numpy versions of the published formula (float64)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmstack.preference.reward import bradley_terry_loss, pair_accuracy


def numpy_bradley_terry(r_c, r_r, margin, coef):
    """-log P(chosen > rejected) under Bradley-Terry, P = 1 / (1 + exp(-(r_c - r_r - m))), plus
    the centring penalty coef * (r_c + r_r)^2."""
    p = 1.0 / (1.0 + np.exp(-(r_c - r_r - margin)))
    return -np.log(p) + coef * (r_c + r_r) ** 2


@pytest.mark.parametrize("with_margin", (False, True))
@pytest.mark.parametrize("coef", (0.0, 0.01, 0.5))
def test_bradley_terry_matches_numpy(with_margin, coef):
    rng = np.random.default_rng(int(coef * 100) + with_margin)
    r_c, r_r = rng.normal(0, 2, 16), rng.normal(0, 2, 16)
    margin = rng.uniform(0, 2, 16) if with_margin else None
    with jax.enable_x64(True):
        losses, m = bradley_terry_loss(jnp.asarray(r_c), jnp.asarray(r_r),
                                       margin=None if margin is None else jnp.asarray(margin),
                                       center_rewards_coefficient=coef)
        losses, m = np.asarray(losses), jax.tree.map(np.asarray, m)
    want = numpy_bradley_terry(r_c, r_r, 0.0 if margin is None else margin, coef)
    np.testing.assert_allclose(losses, want, rtol=1e-12)
    np.testing.assert_array_equal(m["accuracy"], (r_c > r_r).astype(np.float64))
    np.testing.assert_allclose(m["margin"], r_c - r_r, rtol=1e-12)
    np.testing.assert_array_equal(m["rewards/chosen"], r_c)
    np.testing.assert_array_equal(m["rewards/rejected"], r_r)


def test_equal_rewards_give_ln2_and_count_as_wrong():
    r = jnp.asarray([0.0, 1.5, -2.0])
    losses, m = bradley_terry_loss(r, r)
    np.testing.assert_allclose(np.asarray(losses), math.log(2), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(m["accuracy"]), 0.0)


def test_pair_accuracy():
    acc = pair_accuracy(jnp.asarray([1.0, 0.0, -1.0, 2.0]), jnp.asarray([0.0, 0.0, 1.0, -3.0]))
    assert acc.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(acc), [1.0, 0.0, 0.0, 1.0])


def test_centring_gradient_pulls_the_pair_sum_to_zero():
    """d/dr_c of coef (r_c + r_r)^2 is 2 coef (r_c + r_r), added to Bradley-Terry's -sigma(-(r_c - r_r))."""
    r_c, r_r, coef = np.array([1.0, -0.5]), np.array([0.25, -2.0]), 0.1
    with jax.enable_x64(True):
        grad = jax.grad(lambda c: bradley_terry_loss(c, jnp.asarray(r_r), center_rewards_coefficient=coef)[0].sum())
        g = np.asarray(grad(jnp.asarray(r_c)))
    want = -1.0 / (1.0 + np.exp(r_c - r_r)) + 2 * coef * (r_c + r_r)
    np.testing.assert_allclose(g, want, rtol=1e-12)
