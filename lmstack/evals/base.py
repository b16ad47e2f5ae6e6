"""The evaluator contract: a function registered as ``eval.NAME`` that takes an
:class:`EvalContext` and yields ``(metric, value)`` pairs. The same evaluators run inside
training (every ``eval.every`` steps) and from ``lmstack eval`` on a saved checkpoint.
Which ones run is ``config.eval.names``; an evaluator's own settings live under
``config.eval.NAME``."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx

from lmstack import registry


@dataclasses.dataclass
class EvalContext:
    cfg: Any  # the run's config
    data: Any  # lmstack.run.RunData: tokenizer and token streams
    objective: Any
    batches: list  # the objective's held-out batches
    loss_sums: Callable[[dict], dict]  # compiled, sharded: one batch -> summed loss and aux
    model: Callable[[], Any]  # the current model, merged on demand (for embedding, generation)
    run: Any = None  # lmstack.run.Run: for evaluators that need other weights too (eval.forgetting)


def run_evaluators(ctx: EvalContext) -> dict[str, float]:
    """Every evaluator in ``config.eval.names``; metrics are prefixed by evaluator unless it
    is the held-out loss (``perplexity``), whose metrics keep their plain names."""
    results: dict[str, float] = {}
    for name in ctx.cfg.eval.names:
        for metric, value in registry.lookup("eval", name, "eval.names")(ctx):
            results[metric if name == "perplexity" else f"{name}/{metric}"] = float(value)
    return results


def compiled_method(model: Any, method: str, **kwargs: Any) -> Callable[..., Any]:
    """``model.method(*args, **kwargs)`` compiled once. The weights are passed in as state
    (closing over the module would tie its variables to the wrong trace level)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, *args: getattr(nnx.merge(graphdef, st), method)(*args, **kwargs))
    return lambda *args: fn(state, *args)
