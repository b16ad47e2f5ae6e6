"""eval.classification: accuracy, macro-F1 and per-class F1 against a numpy reference, and
its load-time check. (On a trained model it runs in tests/objectives/test_classify.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from lmstack.config import ConfigError, configure
from lmstack.configs.base import base_config
from lmstack.evals.classification import classification_metrics


def reference(gold: np.ndarray, predicted: np.ndarray, n_classes: int) -> tuple[float, float, dict[int, float]]:
    """Textbook definitions, class by class: F1 = 2PR / (P + R) (0 when P + R = 0), the
    macro average over the classes that are gold or predicted somewhere (scikit-learn's
    ``f1_score(average='macro')`` with ``labels=None``)."""
    f1 = {}
    for c in range(n_classes):
        tp = sum(1 for g, p in zip(gold, predicted) if g == c and p == c)
        n_pred, n_gold = sum(1 for p in predicted if p == c), sum(1 for g in gold if g == c)
        if not n_pred and not n_gold:
            continue
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_gold if n_gold else 0.0
        f1[c] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = sum(1 for g, p in zip(gold, predicted) if g == p) / len(gold)
    return accuracy, sum(f1.values()) / len(f1), f1


def check(gold, predicted, n_classes):
    m = classification_metrics(np.asarray(gold), np.asarray(predicted), n_classes)
    accuracy, macro, f1 = reference(gold, predicted, n_classes)
    assert m["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert m["macro_f1"] == pytest.approx(macro, abs=1e-12)
    assert [c for c in range(n_classes) if not np.isnan(m["f1"][c])] == sorted(f1)
    for c, value in f1.items():
        assert m["f1"][c] == pytest.approx(value, abs=1e-12)
    return m


def test_hand_built_predictions():
    # class 0: TP 1, FP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 4/5; class 2: TP 1, FN 1 -> 2/3
    m = check([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 2], 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    np.testing.assert_allclose(m["f1"], [1 / 2, 4 / 5, 2 / 3])
    assert m["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)


def test_random_predictions_match_the_reference():
    rng = np.random.default_rng(0)
    for n_classes in (2, 3, 5):
        gold = rng.integers(0, n_classes, 200).tolist()
        predicted = [g if rng.random() < 0.6 else int(rng.integers(n_classes)) for g in gold]
        check(gold, predicted, n_classes)


def test_classes_never_seen_are_left_out_and_never_right_count_zero():
    # class 3 is neither gold nor predicted: left out (NaN); class 2 is predicted, never gold: F1 0
    m = check([0, 1, 1, 0], [0, 1, 2, 0], 4)
    assert np.isnan(m["f1"][3]) and m["f1"][2] == 0
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_needs_an_objective_with_labels():
    raw = base_config()
    with pytest.raises(ConfigError, match=r"eval.classification scores labelled examples, which "
                                          r"objective.causal_lm has none of: use --config.objective.name=classify "
                                          r"or drop classification from eval.names"):
        configure(raw, ["--config.eval.names=('classification',)"], "test", "test")
