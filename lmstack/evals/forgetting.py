"""Forgetting: how much of the parent's held-out text a continued run still predicts.

``eval.forgetting`` scores consecutive held-out windows of the parent's corpus
(:mod:`lmstack.forgetting.parent`: ``init.data_source``, or the ``init.from`` run's own
data; its held-out split at the parent's ``val_fraction``) with the run's objective, twice:
with the weights the run started from (``init.from``'s, in the run's own layout; computed
once per run and kept in ``WORKDIR/eval/forgetting_before.json``, keyed by ``init.from``,
``train.seed`` and the batches) and with the current weights. It yields ``parent_loss_before``,
``parent_ppl_before``, ``parent_loss_now``, ``parent_ppl_now`` and ``ratio`` =
``parent_ppl_now / parent_ppl_before`` (1: nothing forgotten), reported as
``forgetting/NAME``. Windows of ``data.seq_len``, batches of ``eval.batch_size`` (0:
``train.batch_size``), ``eval.forgetting.batches`` of them (0: ``eval.batches``; 0 there too:
the whole split), as :func:`lmstack.data.pipeline.eval_batches` cuts them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterator

import numpy as np
from flax import nnx

from lmstack.data.pipeline import eval_batches
from lmstack.evals.base import EvalContext
from lmstack.evals.perplexity import perplexity
from lmstack.forgetting.parent import needs_parent_data, parent_streams, windows_only
from lmstack.registry import register
from lmstack.sharding import RULES

DEFAULTS: dict[str, Any] = {"batches": 0}  # 0: eval.batches
BEFORE_FILE = "forgetting_before.json"  # under WORKDIR/eval: the starting weights' scores, computed once


def _problems(cfg: Any) -> list[str]:
    return needs_parent_data(cfg, "eval.forgetting") + windows_only(cfg, "eval.forgetting")


def parent_batches(ctx: EvalContext) -> list[dict[str, np.ndarray]]:
    """The held-out batches of the parent's corpus the evaluator scores (module docstring)."""
    c = ctx.cfg
    _, val = parent_streams(c, ctx.data.tokenizer)
    return eval_batches(val, seq_len=c.data.seq_len, batch_size=c.eval.batch_size or c.train.batch_size,
                        max_batches=c.eval.forgetting.batches or c.eval.batches)


def _scores(ctx: EvalContext, batches: list, loss_sums: Any) -> dict[str, float]:
    return dict(perplexity(dataclasses.replace(ctx, batches=batches, loss_sums=loss_sums)))


def _starting_scores(ctx: EvalContext, batches: list) -> dict[str, float]:
    """The starting weights' scores: from ``WORKDIR/eval/forgetting_before.json`` when it holds
    them for this ``init.from`` and these batches, else computed (and written by process 0)."""
    from lmstack.distributed import any_process, global_batch, is_primary

    run = ctx.run
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(b["tokens"]).tobytes() for b in batches)).hexdigest()[:16]
    key = f"{ctx.cfg.init['from']}|seed={ctx.cfg.train.seed}|{digest}"
    path = run.workdir / "eval" / BEFORE_FILE
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if not any_process(key not in cached):  # every process takes part in computing them, or none
        return cached[key]
    # evaluators run inside the run's mesh, where building the abstract state needs the
    # logical-axis rules to turn the variables' names into mesh axes
    with nnx.logical_axis_rules(RULES):
        start = run.init_state()
    eval_fn = run.eval_step()
    scores = _scores(ctx, batches, lambda b: eval_fn(start, global_batch(b, run.batch_sharding)))
    if is_primary():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{BEFORE_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**cached, key: scores}, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    return scores


@register("eval.forgetting", config_defaults=DEFAULTS, config_problems=_problems)
def forgetting(ctx: EvalContext) -> Iterator[tuple[str, float]]:
    """Yields the parent's held-out loss and perplexity with the starting and the current
    weights, and their perplexity ratio (module docstring). ValueError when the context
    carries no run (the starting weights come from it)."""
    if ctx.run is None:
        raise ValueError("eval.forgetting needs EvalContext.run (the run whose starting weights it compares with)")
    batches = parent_batches(ctx)
    before, now = _starting_scores(ctx, batches), _scores(ctx, batches, ctx.loss_sums)
    if "loss" not in now:
        return
    yield "parent_loss_before", before["loss"]
    yield "parent_ppl_before", before["perplexity"]
    yield "parent_loss_now", now["loss"]
    yield "parent_ppl_now", now["perplexity"]
    yield "ratio", now["perplexity"] / before["perplexity"]
