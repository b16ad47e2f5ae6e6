"""An EvalContext around the tiny model, for running evaluators by name in tests."""

from __future__ import annotations

from types import SimpleNamespace

from lmstack.config import compose
from lmstack.configs.base import base_config
from lmstack.evals.base import EvalContext


def eval_context(model, tokenizer, name: str, batches=(), loss_sums=None, objective: str = "causal_lm",
                 **settings) -> EvalContext:
    """The config composed with ``eval.names=(name,)`` and ``eval.<name>`` = ``settings``."""
    c = base_config()
    c.objective.name = objective
    c.eval.names = (name,)
    if settings:
        c.eval[name] = settings
    return EvalContext(cfg=compose(c), data=SimpleNamespace(tokenizer=tokenizer), objective=None,
                       batches=list(batches), loss_sums=loss_sums, model=lambda: model)
