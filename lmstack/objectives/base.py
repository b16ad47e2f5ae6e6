"""The objective contract: the only place that knows what a batch means and what the loss is.

An objective is a class registered as ``objective.NAME``, built from the whole config. The
trainer, evaluators and benchmarks use only this interface:

- ``data_mode``: ``"stream"`` (fixed windows over a token stream: causal LM pre-training)
  or ``"examples"`` (structured examples that ``prepare`` turns into features, packed by
  ``feature_lengths``: span corruption, SFT, preference pairs).
- ``prepare(example) -> features``: runs in the data pipeline (examples mode).
- ``loss_fn(model, batch, rng) -> (loss_sum, aux)``: runs inside the compiled step.
  ``loss_sum`` is summed over the batch and ``aux["weight"]`` is what it is a sum over
  (tokens, examples, pairs). Every other entry of ``aux`` is a sum too. The trainer divides
  by the total weight after summing over microbatches, so gradient accumulation gives
  exactly the full-batch update; evaluators sum over batches the same way.
- ``frozen_models()``: extra models the loss needs but never trains (a DPO reference
  policy, a reward model); the trainer keeps them out of the gradient. Default: none.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

Aux = dict[str, jax.Array]


class Objective(Protocol):
    data_mode: str

    def __init__(self, cfg: Any) -> None: ...

    def loss_fn(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array | None) -> tuple[jax.Array, Aux]: ...


def normalise(aux: dict[str, Any]) -> dict[str, float]:
    """Per-unit metrics from summed ``aux``: every entry divided by ``aux['weight']``."""
    w = aux["weight"]
    return {k: v / w for k, v in aux.items() if k != "weight"}
