"""The clipped surrogate (PPO / DAPO clip-higher), its clip fraction, and loss aggregation modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmstack.config import ConfigError
from lmstack.rl.aggregation import aggregate
from lmstack.rl.policy_loss import clipped_surrogate_loss, clipped_tokens

EL, EH = 0.2, 0.28


def _batch(seed=0, b=4, t=6):
    rng = np.random.default_rng(seed)
    old = np.log(rng.uniform(0.05, 1, size=(b, t))).astype(np.float32)
    logp = (old + rng.normal(0, 0.3, size=(b, t))).astype(np.float32)
    adv = rng.normal(size=(b, t)).astype(np.float32)
    mask = np.zeros((b, t), np.float32)
    for i, n in enumerate([6, 3, 1, 0][:b]):  # the last row is padding
        mask[i, :n] = 1
    return logp, old, adv, mask


def _np_surrogate(logp, old, adv):
    ratio = np.exp(logp.astype(np.float64) - old)
    return -np.minimum(ratio * adv, np.clip(ratio, 1 - EL, 1 + EH) * adv), ratio


def test_surrogate_and_clip_fraction_match_numpy():
    logp, old, adv, mask = _batch()
    ref, ratio = _np_surrogate(logp, old, adv)
    np.testing.assert_allclose(clipped_surrogate_loss(logp, old, adv, epsilon_low=EL, epsilon_high=EH), ref,
                               rtol=1e-5, atol=1e-6)
    clipped = ((ratio > 1 + EH) & (adv > 0)) | ((ratio < 1 - EL) & (adv < 0))
    assert 0 < clipped.sum() < clipped.size
    got = clipped_tokens(logp, old, adv, epsilon_low=EL, epsilon_high=EH)
    np.testing.assert_array_equal(np.asarray(got), clipped.astype(np.float32))
    num, weight = aggregate(got, mask, "token_mean")
    assert float(num / weight) == pytest.approx((clipped * mask).sum() / mask.sum())


def test_per_sequence_advantages_broadcast_over_tokens():
    logp, old, adv, _ = _batch(1)
    seq_adv = adv[:, 0]
    np.testing.assert_allclose(clipped_surrogate_loss(logp, old, seq_adv, epsilon_low=EL, epsilon_high=EH),
                               _np_surrogate(logp, old, np.repeat(seq_adv[:, None], logp.shape[1], 1))[0],
                               rtol=1e-5, atol=1e-6)


def test_clip_higher_keeps_the_gradient_of_a_rising_token():
    """ratio 1.25 with A > 0: clipped (zero gradient) at epsilon_high 0.2, not at DAPO's 0.28,
    where the gradient wrt logp is -A * ratio."""
    old, a = jnp.log(jnp.array([0.4])), jnp.array([2.0])
    logp = old + jnp.log(1.25)
    for eh, clipped in ((0.2, True), (0.28, False)):
        g = jax.grad(lambda lp: clipped_surrogate_loss(lp, old, a, epsilon_low=0.2, epsilon_high=eh).sum())(logp)
        assert float(clipped_tokens(logp, old, a, epsilon_low=0.2, epsilon_high=eh)[0]) == float(clipped)
        assert float(g[0]) == pytest.approx(0.0 if clipped else -2.0 * 1.25, rel=1e-6)


def _np_aggregate(x, mask, mode, max_tokens=8):
    """TRL GRPOTrainer's loss_type formulas ("grpo", "dapo", "dr_grpo") over the rows that hold tokens."""
    rows = mask.sum(1) > 0
    x, mask = x[rows].astype(np.float64), mask[rows]
    if mode == "seq_mean_token_mean":
        return ((x * mask).sum(-1) / mask.sum(-1)).mean()
    if mode == "token_mean":
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum() / (x.shape[0] * max_tokens)


@pytest.mark.parametrize("mode", ["seq_mean_token_mean", "token_mean", "fixed_denominator"])
def test_aggregate_matches_numpy_and_accumulates_exactly(mode):
    """The full batch and the sum over microbatches (rows i::n, as lmstack.step splits) of
    (numerator, weight) give the same loss as the mode's formula on the whole batch."""
    logp, old, adv, mask = _batch(2, b=8)
    mask[4:] = mask[:4][::-1]
    per_token = np.asarray(clipped_surrogate_loss(logp, old, adv, epsilon_low=EL, epsilon_high=EH))
    expected = _np_aggregate(per_token, mask, mode)
    num, weight = aggregate(per_token, mask, mode, max_tokens=8)
    assert float(num / weight) == pytest.approx(expected, rel=1e-5)
    for n in (2, 4):
        parts = [aggregate(per_token[i::n], mask[i::n], mode, max_tokens=8) for i in range(n)]
        total = sum(float(p[0]) for p in parts) / sum(float(p[1]) for p in parts)
        assert total == pytest.approx(expected, rel=1e-5)


def test_unknown_mode_and_missing_max_tokens_are_refused():
    x = jnp.zeros((2, 3))
    with pytest.raises(ConfigError) as e:
        aggregate(x, x, "seq_mean_token_sum")
    assert str(e.value) == ("objective.loss_aggregation='seq_mean_token_sum': unknown; choose one of "
                            "seq_mean_token_mean, token_mean, fixed_denominator")
    with pytest.raises(ConfigError) as e:
        aggregate(x, x, "fixed_denominator")
    assert str(e.value) == ("objective.loss_aggregation=fixed_denominator needs max_tokens > 0 (Dr. GRPO's constant "
                            "denominator, the rollout's maximum completion length), got None")
