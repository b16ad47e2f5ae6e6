"""Held-out loss and perplexity: the objective's summed loss over a fixed set of batches."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from lmstack.evals.base import EvalContext
from lmstack.registry import register


@register("eval.perplexity")
def perplexity(ctx: EvalContext) -> Iterator[tuple[str, float]]:
    """Yields ``loss`` (per weighted unit, e.g. per token), ``perplexity`` and every other
    summed metric of the objective divided by the total weight, over the held-out batches."""
    totals: dict[str, float] = {}
    for batch in ctx.batches:
        for k, v in ctx.loss_sums(batch).items():
            totals[k] = totals.get(k, 0.0) + float(np.asarray(v))
    weight = totals.pop("weight", 0.0)
    if not weight:
        return
    loss = totals.pop("loss") / weight
    yield "loss", loss
    yield "perplexity", math.exp(min(loss, 50.0))
    for k, v in totals.items():
        yield k, v / weight
