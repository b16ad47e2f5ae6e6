"""GAE, the clipped value loss, the KL-penalised reward and the KL coefficient controllers."""

import numpy as np
import pytest

from lmstack.rl.gae import gae
from lmstack.rl.kl_penalty import AdaptiveKLController, FixedKLController, kl_penalised_rewards
from lmstack.rl.value_loss import clipped_value_loss


def _loop_gae(rewards, values, mask, gamma, lam):
    """Plain-python GAE: each row's unmasked tokens taken out in order, the textbook recursion
    run over them with V = 0 after the last, the results put back (0 on masked tokens)."""
    adv = np.zeros_like(rewards, np.float64)
    for i in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[i, t]]
        last = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            next_v = values[i, idx[k + 1]] if k + 1 < len(idx) else 0.0
            last = rewards[i, t] + gamma * next_v - values[i, t] + gamma * lam * last
            adv[i, t] = last
    return adv, (adv + values) * mask


def _rollout(seed=0):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(3, 7)).astype(np.float32)
    v = rng.normal(size=(3, 7)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 1, 1, 0]], np.float32)  # a hole
    return r * mask, v * mask, mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_python_loop(gamma, lam):
    r, v, mask = _rollout()
    adv, ret = gae(r, v, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = _loop_gae(r, v, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)


def test_lambda_one_gives_monte_carlo_returns():
    r, v, mask = (x[:2] for x in _rollout(1))  # rows without holes: returns are the rewards to go
    _, ret = gae(r, v, mask, gamma=1.0, lam=1.0)
    to_go = np.cumsum(r[:, ::-1], axis=1)[:, ::-1] * mask
    np.testing.assert_allclose(ret, to_go, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip_range", [0.2, None])
def test_clipped_value_loss_matches_numpy(clip_range):
    rng = np.random.default_rng(2)
    old, ret = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    new = old + rng.normal(0, 0.5, size=(2, 5))
    unclipped = (new - ret) ** 2
    ref = 0.5 * (unclipped if clip_range is None
                 else np.maximum(unclipped, (old + np.clip(new - old, -0.2, 0.2) - ret) ** 2))
    np.testing.assert_allclose(clipped_value_loss(new, old, ret, clip_range=clip_range), ref, rtol=1e-5, atol=1e-6)


def test_kl_penalised_rewards_put_the_score_on_the_last_token():
    rng = np.random.default_rng(3)
    kl = rng.normal(size=(3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], np.float32)
    scores = np.array([2.0, -1.0, 5.0], np.float32)
    ref = -0.1 * kl * mask
    for i in range(3):  # OpenRLHF compute_reward's loop: the score on the last masked token
        for t in reversed(range(5)):
            if mask[i, t]:
                ref[i, t] += scores[i]
                break
    np.testing.assert_allclose(kl_penalised_rewards(scores, kl, mask, 0.1), ref, rtol=1e-6, atol=1e-6)


def test_adaptive_kl_controller_follows_ziegler_update():
    ctl = AdaptiveKLController(target=6.0, horizon=10_000)
    for kl, n in ((9.0, 256), (6.6, 256), (1.0, 512)):
        err = np.clip(kl / 6.0 - 1, -0.2, 0.2)
        assert float(ctl.update(0.2, kl, n)) == pytest.approx(0.2 * (1 + err * n / 10_000), rel=1e-6)
    assert float(ctl.update(0.2, 12.0, 256)) > 0.2 > float(ctl.update(0.2, 3.0, 256))
    assert FixedKLController().update(0.05, 100.0, 256) == 0.05
