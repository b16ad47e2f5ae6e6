"""Held-out loss and perplexity: the objective's summed loss over a fixed set of batches."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from lmstack.registry import register


@register("eval.perplexity")
def perplexity(loss_sums: Callable[[Any], dict[str, Any]], batches: Iterable[Any]) -> Iterator[tuple[str, float]]:
    """Yields ``loss`` (per weighted unit, e.g. per token), ``perplexity`` and every other
    summed metric of the objective divided by the total weight."""
    totals: dict[str, float] = {}
    for batch in batches:
        for k, v in loss_sums(batch).items():
            totals[k] = totals.get(k, 0.0) + float(np.asarray(v))
    weight = totals.pop("weight", 0.0)
    if not weight:
        return
    loss = totals.pop("loss") / weight
    yield "loss", loss
    yield "perplexity", math.exp(min(loss, 50.0))
    for k, v in totals.items():
        yield k, v / weight
