"""Classification quality on the held-out examples: accuracy, macro-F1 and per-class F1 of the
model's predictions (the argmax of ``model.classify``), for ``objective.classify``.

F1 of class c is ``2 TP / (2 TP + FP + FN)``; macro-F1 is the mean over the classes that
occur among the gold labels or the predictions, which is scikit-learn's
``f1_score(y_true, y_pred, average='macro')`` with its default ``labels=None``: a class that
is neither gold nor predicted anywhere is left out rather than counted as 0 (with
``labels`` listing every class and ``zero_division=0`` it would count as 0 instead).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from lmstack.evals.base import EvalContext, compiled_method
from lmstack.registry import register


def classification_metrics(gold: np.ndarray, predicted: np.ndarray, n_classes: int) -> dict[str, Any]:
    """``accuracy``, ``macro_f1`` and ``f1`` (float64 (n_classes,), NaN for a class neither
    gold nor predicted) of int class indices ``gold`` and ``predicted`` (n,), n > 0
    (conventions in the module docstring)."""
    confusion = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(confusion, (gold, predicted), 1)
    tp = np.diag(confusion).astype(np.float64)
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    present = tp + fp + fn > 0
    f1 = np.full(n_classes, np.nan)
    f1[present] = 2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])
    return {"accuracy": tp.sum() / len(gold), "macro_f1": float(np.mean(f1[present])), "f1": f1}


def predictions(ctx: EvalContext) -> tuple[np.ndarray, np.ndarray]:
    """(gold, predicted) class indices of the held-out batches' labelled rows."""
    classify = compiled_method(ctx.model(), "classify")
    gold, predicted = [], []
    for batch in ctx.batches:
        labels = np.asarray(batch["labels"])
        logits = np.asarray(classify(batch["tokens"], batch["segment_ids"]))
        gold.append(labels[labels >= 0])
        predicted.append(np.argmax(logits, axis=-1)[labels >= 0])
    return np.concatenate(gold), np.concatenate(predicted)


def _problems(cfg: Any) -> list[str]:
    if "labels" not in cfg.objective:
        return [f"eval.classification scores labelled examples, which objective.{cfg.objective.name} has none of: "
                f"use --config.objective.name=classify or drop classification from eval.names"]
    return []


@register("eval.classification", config_problems=_problems)
def classification(ctx: EvalContext) -> Iterator[tuple[str, float]]:
    """Yields ``accuracy``, ``macro_f1`` and ``f1/LABEL`` for each label that is gold or predicted."""
    gold, predicted = predictions(ctx)
    if not len(gold):
        return
    names = ctx.objective.labels
    m = classification_metrics(gold, predicted, len(names))
    yield "accuracy", m["accuracy"]
    yield "macro_f1", m["macro_f1"]
    for name, f1 in zip(names, m["f1"]):
        if not np.isnan(f1):
            yield f"f1/{name}", float(f1)
