"""Multiple choice by log-likelihood, as lm-evaluation-harness's ``multiple_choice`` output type.

Each choice is scored as the continuation ``target_delimiter + choice`` of the document's
prompt (:func:`lmstack.evals.loglikelihood.continuation_logprobs`). Per document:

- ``acc``: the choice with the largest summed log-probability is the gold one;
- ``acc_norm``: the largest summed log-probability divided by the choice's length in
  characters, the choice string without the target delimiter (lm-eval:
  ``completion_len = [len(i) for i in choices]``);
- ``acc_bytes``: the same divided by the choice's UTF-8 length in bytes (the byte
  normalisation of OLMES / OLMo evals; equal to ``acc_norm`` for ASCII choices).

Ties go to the first choice (``np.argmax``). Tasks: ``task=stdlib_docstrings`` (built in,
:mod:`lmstack.evals.stdlib_docstrings`) or ``task=jsonl`` with ``path`` (:mod:`lmstack.evals.tasks`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from lmstack.evals.base import EvalContext
from lmstack.evals.fewshot import FEWSHOT_DEFAULTS, fewshot_contexts
from lmstack.evals.loglikelihood import continuation_logprobs
from lmstack.evals.stdlib_docstrings import stdlib_docstrings
from lmstack.evals.tasks import minimum_problems, multiple_choice_docs
from lmstack.registry import register

# config.eval.multiple_choice (the few-shot keys: lmstack.evals.fewshot): which task, its JSONL
# file (task=jsonl), a separate JSONL file of few-shot examples ("": the task's own documents),
# the first N documents (0: all), requests per batch, model positions (0: the model's max_seq_len).
DEFAULTS = dict(task="stdlib_docstrings", path="", fewshot_path="", limit=0, batch_size=16, max_length=0,
                **FEWSHOT_DEFAULTS)
TASKS = ("stdlib_docstrings", "jsonl")


def choice_predictions(logprobs: Sequence[float], choices: Sequence[str]) -> dict[str, int]:
    """The index each metric picks from one document's summed log-probabilities (one per
    choice): ``acc`` (raw), ``acc_norm`` (per character), ``acc_bytes`` (per UTF-8 byte)."""
    ll = np.asarray(logprobs, np.float64)
    chars = np.array([len(c) for c in choices], np.float64)
    nbytes = np.array([len(c.encode("utf-8")) for c in choices], np.float64)
    return {"acc": int(np.argmax(ll)), "acc_norm": int(np.argmax(ll / chars)), "acc_bytes": int(np.argmax(ll / nbytes))}


def multiple_choice_metrics(logprobs: Sequence[Sequence[float]], docs: Sequence[dict]) -> dict[str, float]:
    """Mean ``acc``, ``acc_norm`` and ``acc_bytes`` over documents ``{"choices", "gold"}``."""
    hits: dict[str, list[float]] = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for lp, doc in zip(logprobs, docs, strict=True):
        for metric, pred in choice_predictions(lp, doc["choices"]).items():
            hits[metric].append(float(pred == doc["gold"]))
    return {k: float(np.mean(v)) for k, v in hits.items()}


def _problems(cfg: Any) -> list[str]:
    s = cfg.eval.multiple_choice
    out = minimum_problems("multiple_choice", s, dict(num_fewshot=0, batch_size=1, limit=0, max_length=0))
    if s.task == "jsonl" and not Path(s.path).is_file():
        out.append(f"eval.multiple_choice.path={s.path!r} is not a file: point --config.eval.multiple_choice.path at "
                   f"a JSONL file of {{\"query\": ..., \"choices\": [...], \"gold\": N}} objects")
    if s.task != "jsonl" and s.path:
        out.append(f"eval.multiple_choice.path is set but task={s.task!r} is built in: set "
                   f"--config.eval.multiple_choice.task=jsonl to read the file, or drop the path")
    if s.fewshot_path and not Path(s.fewshot_path).is_file():
        out.append(f"eval.multiple_choice.fewshot_path={s.fewshot_path!r} is not a file: point it at a JSONL file "
                   f"or set it to '' (shots from the task's own documents)")
    return out


def load_docs(settings: Any) -> list[dict]:
    """The documents ``eval.multiple_choice`` names (all of them; ``limit`` is applied later)."""
    if settings.task == "jsonl":
        return multiple_choice_docs(settings.path, "eval.multiple_choice.path")
    return stdlib_docstrings()


@register("eval.multiple_choice", config_defaults=DEFAULTS, config_choices={"task": TASKS},
          config_problems=_problems)
def multiple_choice(ctx: EvalContext) -> Iterator[tuple[str, float]]:
    """Yields ``acc``, ``acc_norm`` and ``acc_bytes`` over the task's documents."""
    s = ctx.cfg.eval.multiple_choice
    docs = load_docs(s)
    pool = multiple_choice_docs(s.fewshot_path, "eval.multiple_choice.fewshot_path") if s.fewshot_path else docs
    docs = docs[:s.limit] if s.limit else docs
    prompts = fewshot_contexts(docs, lambda d: d["query"], lambda d: d["choices"][d["gold"]], pool=pool,
                               same_split=not s.fewshot_path, num_fewshot=s.num_fewshot, fewshot_seed=s.fewshot_seed,
                               description=s.description, target_delimiter=s.target_delimiter,
                               fewshot_delimiter=s.fewshot_delimiter)
    pairs = [(p, s.target_delimiter + c) for p, d in zip(prompts, docs) for c in d["choices"]]
    scored = continuation_logprobs(ctx.model(), ctx.data.tokenizer, pairs, batch_size=s.batch_size,
                                   max_length=s.max_length)
    logprobs, at = [], 0
    for d in docs:
        logprobs.append([lp for lp, _ in scored[at:at + len(d["choices"])]])
        at += len(d["choices"])
    yield from multiple_choice_metrics(logprobs, docs).items()
