"""The DPO family and KTO against numpy versions of their published formulas (float64)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmstack.config import ConfigError
from lmstack.preference.losses import LOSS_TYPES, kto_loss, preference_loss

BETAS = (0.05, 0.1, 0.5, 2.0)
PAIRED = [t for t in LOSS_TYPES if t != "kto"]


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def pairs(seed=0, b=8):
    """Summed completion log-probs of policy and reference and the completion lengths."""
    rng = np.random.default_rng(seed)
    len_c = rng.integers(1, 20, b).astype(np.float64)
    len_r = rng.integers(1, 20, b).astype(np.float64)
    per_token = lambda n: -n * rng.uniform(1e-4, 3.0, b)  # noqa: E731
    return {"policy_chosen": per_token(len_c), "policy_rejected": per_token(len_r),
            "ref_chosen": per_token(len_c), "ref_rejected": per_token(len_r),
            "chosen_lengths": len_c, "rejected_lengths": len_r}


def reference_loss(loss_type, p, beta, eps, gamma):
    """The published formulas, written from the papers (TRL's conventions for normalisation)."""
    pc, pr, lc, lr = p["policy_chosen"], p["policy_rejected"], p["chosen_lengths"], p["rejected_lengths"]
    if loss_type not in ("simpo", "orpo"):
        rc, rr = p["ref_chosen"], p["ref_rejected"]
        z = (pc - rc) - (pr - rr)  # DPO: log pi/ref (chosen) - log pi/ref (rejected)
        z_avg = (pc - rc) / lc - (pr - rr) / lr
    if loss_type == "sigmoid":  # DPO eq. 7; cDPO: expected loss under flip probability eps
        return -(1 - eps) * log_sigmoid(beta * z) - eps * log_sigmoid(-beta * z)
    if loss_type == "robust":  # rDPO: unbiased estimator under flips
        return ((1 - eps) * -log_sigmoid(beta * z) - eps * -log_sigmoid(-beta * z)) / (1 - 2 * eps)
    if loss_type == "hinge":  # SLiC
        return np.maximum(0.0, 1 - beta * z)
    if loss_type == "ipo":  # IPO eq. 17, log-ratios per completion token
        return (z_avg - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        return -log_sigmoid(beta * z_avg)
    if loss_type == "simpo":  # reward = beta * mean token log-prob, target margin gamma
        u = beta * pc / lc - beta * pr / lr - gamma
        return -(1 - eps) * log_sigmoid(u) - eps * log_sigmoid(-u)
    if loss_type == "orpo":  # odds(y) = P(y) / (1 - P(y)), P = exp(mean token log-prob)
        prob_c, prob_r = np.exp(pc / lc), np.exp(pr / lr)
        log_odds_ratio = np.log((prob_c / (1 - prob_c)) / (prob_r / (1 - prob_r)))
        return -beta * log_sigmoid(log_odds_ratio)
    raise AssertionError(loss_type)


def run64(fn, *args, **kwargs):
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) if isinstance(a, np.ndarray) else a for a in args]
        kwargs = {k: jnp.asarray(v, jnp.float64) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
        out = fn(*args, **kwargs)
        return jax.tree.map(np.asarray, out)


def options(loss_type, beta, eps):
    smoothed = loss_type in ("sigmoid", "robust", "simpo")
    return {"beta": beta, "label_smoothing": eps if smoothed else 0.0, "gamma": 0.7 if loss_type == "simpo" else 0.0}


def call(loss_type, p, **opts):
    return run64(preference_loss, loss_type, p["policy_chosen"], p["policy_rejected"], p["ref_chosen"],
                 p["ref_rejected"], chosen_lengths=p["chosen_lengths"], rejected_lengths=p["rejected_lengths"], **opts)


CASES = [(t, beta, eps) for t in PAIRED for beta in BETAS
         for eps in ((0.0, 0.1, 0.3) if t in ("sigmoid", "robust", "simpo") else (0.0,))]


@pytest.mark.parametrize("loss_type, beta, eps", CASES)
def test_paired_losses_match_their_published_formulas(loss_type, beta, eps):
    p = pairs(seed=int(beta * 100) + int(eps * 10))
    opts = options(loss_type, beta, eps)
    losses, _ = call(loss_type, p, **opts)
    want = reference_loss(loss_type, p, beta, opts["label_smoothing"], opts["gamma"])
    assert losses.dtype == np.float64 and losses.shape == want.shape
    np.testing.assert_allclose(losses, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_type", PAIRED)
def test_metrics_are_trls_implicit_rewards(loss_type):
    beta = 0.3
    p = pairs(seed=5)
    _, m = call(loss_type, p, **options(loss_type, beta, 0.0))
    if loss_type in ("simpo", "orpo"):  # reference-free: beta * mean token log-prob
        rc, rr = beta * p["policy_chosen"] / p["chosen_lengths"], beta * p["policy_rejected"] / p["rejected_lengths"]
    else:
        rc, rr = beta * (p["policy_chosen"] - p["ref_chosen"]), beta * (p["policy_rejected"] - p["ref_rejected"])
    np.testing.assert_allclose(m["rewards/chosen"], rc, rtol=1e-12)
    np.testing.assert_allclose(m["rewards/rejected"], rr, rtol=1e-12)
    np.testing.assert_allclose(m["rewards/margins"], rc - rr, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(m["rewards/accuracies"], (rc > rr).astype(np.float64))
    np.testing.assert_array_equal(m["logps/chosen"], p["policy_chosen"])
    np.testing.assert_array_equal(m["logps/rejected"], p["policy_rejected"])
    assert 0 < m["rewards/accuracies"].sum() < len(rc)  # the data exercises both outcomes
    if loss_type == "orpo":
        avg_c, avg_r = p["policy_chosen"] / p["chosen_lengths"], p["policy_rejected"] / p["rejected_lengths"]
        log_odds = (avg_c - np.log1p(-np.exp(avg_c))) - (avg_r - np.log1p(-np.exp(avg_r)))
        np.testing.assert_allclose(m["log_odds_chosen"], log_odds, rtol=1e-10)
        np.testing.assert_allclose(m["log_odds_ratio"], log_sigmoid(log_odds), rtol=1e-10)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("eps", (0.0, 0.2))
def test_policy_equal_to_reference_invariants(beta, eps):
    """sigmoid (and cDPO, robust, sigmoid_norm) DPO = ln 2; IPO = 1/(4 beta^2) with
    length-averaged log-ratios (TRL's normalisation; any normalisation of a zero margin gives
    the same); hinge = 1."""
    p = pairs(seed=3)
    p["ref_chosen"], p["ref_rejected"] = p["policy_chosen"], p["policy_rejected"]
    for loss_type, smoothed, want in (("sigmoid", True, math.log(2)), ("robust", True, math.log(2)),
                                      ("sigmoid_norm", False, math.log(2)), ("hinge", False, 1.0),
                                      ("ipo", False, 1 / (4 * beta**2))):
        losses, m = call(loss_type, p, beta=beta, label_smoothing=eps if smoothed else 0.0)
        np.testing.assert_allclose(losses, want, rtol=1e-12, err_msg=loss_type)
        np.testing.assert_array_equal(m["rewards/chosen"], 0.0)


def test_sigmoid_dpo_gradient_is_the_analytic_one():
    """d/d pi_c of -log sigma(beta z) is -beta sigma(-beta z); d/d pi_r is +beta sigma(-beta z)."""
    beta = 0.25
    p = pairs(seed=7)

    def total(pc, pr):
        return preference_loss("sigmoid", pc, pr, p["ref_chosen"], p["ref_rejected"], chosen_lengths=p["chosen_lengths"],
                               rejected_lengths=p["rejected_lengths"], beta=beta)[0].sum()

    grad_c, grad_r = run64(jax.grad(total, argnums=(0, 1)), p["policy_chosen"], p["policy_rejected"])
    z = (p["policy_chosen"] - p["ref_chosen"]) - (p["policy_rejected"] - p["ref_rejected"])
    np.testing.assert_allclose(grad_c, -beta * sigmoid(-beta * z), rtol=1e-12)
    np.testing.assert_allclose(grad_r, beta * sigmoid(-beta * z), rtol=1e-12)


def test_orpo_log_odds_stay_accurate_in_float32_near_probability_one():
    """Completions the policy already finds near certain (mean log-prob -1e-4) in float32:
    log(1 - e^a) computed as log(-expm1(a)) keeps the loss within 1e-6 of the float64 formula."""
    avg_c = np.array([-1e-4, -3e-4, -2.0], np.float32)
    avg_r = np.array([-5e-4, -1e-3, -1e-4], np.float32)
    lengths = np.ones(3, np.float32)
    losses, m = preference_loss("orpo", jnp.asarray(avg_c), jnp.asarray(avg_r), None, None,
                                chosen_lengths=lengths, rejected_lengths=lengths, beta=0.1)
    p = {"policy_chosen": avg_c.astype(np.float64), "policy_rejected": avg_r.astype(np.float64),
         "chosen_lengths": np.ones(3), "rejected_lengths": np.ones(3)}
    assert losses.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(losses), reference_loss("orpo", p, 0.1, 0, 0), rtol=1e-6)


def numpy_kto(policy, ref, desirable, kl_policy, kl_ref, beta, w_d, w_u):
    """KTO with the batch reference point z = max(0, mean KL of mismatched pairs)."""
    z = max(0.0, float(np.mean(kl_policy - kl_ref)))
    r = policy - ref
    return np.where(desirable, w_d * (1 - sigmoid(beta * (r - z))), w_u * (1 - sigmoid(beta * (z - r)))), z


def kto_inputs(seed, kl_shift):
    rng = np.random.default_rng(seed)
    b, k = 9, 6
    policy, ref = -rng.uniform(1, 40, b), -rng.uniform(1, 40, b)
    desirable = rng.random(b) < 0.5
    desirable[:2] = [True, False]
    kl_ref = -rng.uniform(1, 40, k)
    kl_policy = kl_ref + rng.normal(kl_shift, 1.0, k)
    return policy, ref, desirable, kl_policy, kl_ref


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("kl_shift", (-3.0, 2.0))  # a negative mean KL is clamped to z = 0
@pytest.mark.parametrize("weights", ((1.0, 1.0), (1.0, 1.33)))
def test_kto_matches_its_published_formula(beta, kl_shift, weights):
    policy, ref, desirable, kl_policy, kl_ref = kto_inputs(int(beta * 100), kl_shift)
    losses, m = run64(kto_loss, policy, ref, jnp.asarray(desirable), kl_policy, kl_ref, beta=beta,
                      desirable_weight=weights[0], undesirable_weight=weights[1])
    want, z = numpy_kto(policy, ref, desirable, kl_policy, kl_ref, beta, *weights)
    np.testing.assert_allclose(losses, want, rtol=1e-12)
    assert (z == 0.0) == (kl_shift < 0)
    np.testing.assert_allclose(m["kl"], z, rtol=1e-12)
    rewards = beta * (policy - ref)
    np.testing.assert_allclose(m["rewards/chosen_sum"], rewards[desirable].sum(), rtol=1e-12)
    np.testing.assert_allclose(m["rewards/rejected_sum"], rewards[~desirable].sum(), rtol=1e-12)
    np.testing.assert_allclose(m["logps/chosen_sum"], policy[desirable].sum(), rtol=1e-12)
    np.testing.assert_allclose(m["logps/rejected_sum"], policy[~desirable].sum(), rtol=1e-12)
    assert m["count/chosen"] == desirable.sum() and m["count/rejected"] == (~desirable).sum()


def test_kto_leaves_invalid_rows_out_of_the_reference_point_and_the_metrics():
    """``valid_b``: the rows marked invalid (a batch's padding) count in neither ``z`` (the
    mean KL over the valid rows only), the reward and log-prob sums nor the counts; the valid
    rows' losses are the formula's on the valid rows alone."""
    policy, ref, desirable, _, _ = kto_inputs(5, 0.0)
    valid = np.ones(len(policy), bool)
    valid[[3, 7]] = False
    kl_policy = policy + np.linspace(0.5, 2.0, len(policy))  # row-aligned, a positive mean KL
    losses, m = run64(kto_loss, policy, ref, jnp.asarray(desirable), kl_policy, ref, beta=0.3,
                      valid_b=jnp.asarray(valid))
    v = valid
    want, z = numpy_kto(policy[v], ref[v], desirable[v], kl_policy[v], ref[v], 0.3, 1.0, 1.0)
    assert z > 0
    np.testing.assert_allclose(m["kl"], z, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(losses)[v], want, rtol=1e-12)
    rewards = 0.3 * (policy - ref)
    np.testing.assert_allclose(m["rewards/chosen_sum"], rewards[v & desirable].sum(), rtol=1e-12)
    np.testing.assert_allclose(m["rewards/rejected_sum"], rewards[v & ~desirable].sum(), rtol=1e-12)
    np.testing.assert_allclose(m["logps/rejected_sum"], policy[v & ~desirable].sum(), rtol=1e-12)
    assert m["count/chosen"] == (v & desirable).sum() and m["count/rejected"] == (v & ~desirable).sum()


def test_kto_is_one_half_when_policy_equals_reference():
    policy, _, desirable, kl_policy, _ = kto_inputs(1, 0.0)
    for beta in BETAS:
        losses, m = run64(kto_loss, policy, policy, jnp.asarray(desirable), kl_policy, kl_policy, beta=beta)
        np.testing.assert_allclose(losses, 0.5, rtol=1e-12)
        assert m["kl"] == 0.0


def test_kto_reference_point_carries_no_gradient():
    policy, ref, desirable, kl_policy, kl_ref = kto_inputs(2, 2.0)

    def total(policy, kl_policy):
        return kto_loss(policy, ref, jnp.asarray(desirable), kl_policy, kl_ref, beta=0.5)[0].sum()

    grad_policy, grad_kl = run64(jax.grad(total, argnums=(0, 1)), policy, kl_policy)
    np.testing.assert_array_equal(grad_kl, 0.0)
    z = max(0.0, float(np.mean(kl_policy - kl_ref)))
    r = policy - ref
    s = np.where(desirable, sigmoid(0.5 * (r - z)), sigmoid(0.5 * (z - r)))
    # d/dr (1 - sigma(beta (r - z))) = -beta s (1 - s); d/dr (1 - sigma(beta (z - r))) = +beta s (1 - s)
    np.testing.assert_allclose(grad_policy, np.where(desirable, -1, 1) * 0.5 * s * (1 - s), rtol=1e-12)


def test_unknown_loss_type_names_the_key_and_the_choices():
    p = pairs()
    with pytest.raises(ConfigError) as e:
        call("dpo", p, beta=0.1)
    assert str(e.value) == ("objective.loss_type: 'dpo' is not one of sigmoid, robust, hinge, ipo, sigmoid_norm, "
                            "simpo, orpo, kto")


@pytest.mark.parametrize("loss_type, opts, message", [
    ("sigmoid", {"beta": 0.0}, "objective.beta=0.0: must be positive"),
    ("robust", {"beta": 0.1, "label_smoothing": 0.5},
     "objective.label_smoothing=0.5: must be in [0, 0.5) (the probability that a preference label is flipped)"),
    ("hinge", {"beta": 0.1, "label_smoothing": 0.1},
     "objective.label_smoothing=0.1 has no effect with objective.loss_type=hinge: set it to 0, or use one of "
     "sigmoid, robust, simpo"),
    ("sigmoid", {"beta": 0.1, "gamma": 0.5},
     "objective.gamma=0.5 is SimPO's target margin and has no effect with objective.loss_type=sigmoid: set it to 0, "
     "or use simpo"),
])
def test_bad_options_are_one_line_config_errors(loss_type, opts, message):
    with pytest.raises(ConfigError) as e:
        call(loss_type, pairs(), **opts)
    assert str(e.value) == message


def test_wiring_mistakes_are_value_errors():
    p = pairs()
    with pytest.raises(ValueError, match="^loss_type kto is unpaired .* score it with kto_loss$"):
        call("kto", p, beta=0.1)
    with pytest.raises(ValueError, match="^loss_type ipo compares the policy with a reference: pass ref_chosen"):
        run64(preference_loss, "ipo", p["policy_chosen"], p["policy_rejected"], None, None,
              chosen_lengths=p["chosen_lengths"], rejected_lengths=p["rejected_lengths"], beta=0.1)
    policy, ref, desirable, kl_policy, kl_ref = kto_inputs(0, 0.0)
    with pytest.raises(ConfigError, match=r"^objective\.undesirable_weight=0\.0: must be positive$"):
        run64(kto_loss, policy, ref, desirable, kl_policy, kl_ref, beta=0.1, undesirable_weight=0.0)
