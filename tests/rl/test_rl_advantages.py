"""Group-relative advantages (GRPO / Dr. GRPO / RLOO) and masked whitening against numpy."""

import numpy as np
import pytest

from lmstack.config import ConfigError
from lmstack.rl.advantages import group_advantages, rloo_advantages, whiten

# eps moves |A| = 0.5 / (std + eps) by about 0.5 * eps / std**2 <= 2e-6 here (std >= 0.5),
# float32 rounding adds ~1e-7: the 4-decimal headline values are checked to 1e-5 against their
# exact values 1/sqrt(2), 1 and 1/2.
EPS = 1e-6


@pytest.mark.parametrize("std, expected", [("unbiased", 1 / np.sqrt(2)), ("population", 1.0), ("none", 0.5)])
def test_two_samples_rewards_0_1(std, expected):
    adv = np.asarray(group_advantages(np.array([0.0, 1.0]), 2, std=std, eps=EPS))
    np.testing.assert_allclose(adv, [-expected, expected], rtol=0, atol=1e-5)
    assert adv.dtype == np.float32


def test_matches_numpy_per_group_and_layouts_agree():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(3, 5)).astype(np.float32)
    for std, ddof in (("unbiased", 1), ("population", 0)):
        ref = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=ddof, keepdims=True) + 1e-4)
        np.testing.assert_allclose(group_advantages(r, std=std), ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(group_advantages(r.reshape(-1), 5, std=std), ref.reshape(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(group_advantages(r, std="none"), r - r.mean(1, keepdims=True), atol=1e-6)


def test_rloo_is_reward_minus_mean_of_the_others():
    rng = np.random.default_rng(1)
    r = rng.normal(size=(2, 4)).astype(np.float32)
    ref = np.array([[r[g, i] - np.delete(r[g], i).mean() for i in range(4)] for g in range(2)])
    np.testing.assert_allclose(rloo_advantages(r.reshape(-1), 4), ref.reshape(-1), atol=1e-6)
    np.testing.assert_allclose(rloo_advantages(np.array([0.0, 1.0]), 2), [-1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_masked_numpy(shift_mean):
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(3, 6)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], np.float32)
    vals = x[mask > 0]
    ref = (x - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8) + (0 if shift_mean else vals.mean())
    np.testing.assert_allclose(whiten(x, mask, shift_mean=shift_mean), ref * mask, rtol=1e-5, atol=1e-5)


def test_group_of_one_is_refused():
    with pytest.raises(ConfigError) as e:
        group_advantages(np.array([1.0, 0.0, 1.0]), 1)
    assert str(e.value) == ("objective.num_generations=1: group-relative advantages need at least 2 completions per "
                            "prompt (with 1 every advantage is 0): set objective.num_generations >= 2")
    with pytest.raises(ConfigError, match=r"^objective.num_generations=1: "):
        rloo_advantages(np.zeros((4, 1)))


def test_ragged_batch_and_unknown_std_are_refused():
    with pytest.raises(ConfigError) as e:
        group_advantages(np.zeros(5), 2)
    assert str(e.value) == ("5 rewards do not split into groups of objective.num_generations=2: the rollout batch "
                            "must hold num_generations completions per prompt")
    with pytest.raises(ConfigError) as e:
        group_advantages(np.zeros(4), 2, std="sample")
    assert str(e.value) == "objective.advantage_std='sample': unknown; choose one of unbiased, population, none"
