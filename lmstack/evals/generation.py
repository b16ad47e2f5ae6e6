"""Greedy generation until a stop string, and the ``generation`` evaluator that scores it.

:func:`generate_until` follows lm-evaluation-harness's ``generate_until`` (HF backend): the
prompt (after bos where the tokenizer starts documents with one) keeps its last
``max_length - max_new_tokens`` tokens, the continuation is greedy, and its text is cut at
the end-of-sequence token and then before the first occurrence of any stop string. Each
prompt is generated for the full ``max_new_tokens`` (one compiled prefill + scan,
:func:`lmstack.generate.generate`) and cut afterwards, which gives the same text as stopping
early under greedy decoding. Prompts are batched by token length, since the KV-cache decoder
takes equal-length prompts: one compile per distinct prompt length.

The ``generation`` evaluator reads ``{"question", "answer"}`` JSONL (:mod:`lmstack.evals.tasks`),
prompts with ``doc_to_text`` after optional few-shot examples (:mod:`lmstack.evals.fewshot`) and
scores each output against ``doc_to_target`` by ``scoring`` (:mod:`lmstack.evals.answers`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from lmstack.data.sources import DataError
from lmstack.data.tokenizers import Tokenizer, with_bos
from lmstack.evals.answers import SCORINGS, score_answer
from lmstack.evals.base import EvalContext
from lmstack.evals.fewshot import FEWSHOT_DEFAULTS, fewshot_contexts
from lmstack.evals.loglikelihood import prefix_token
from lmstack.evals.tasks import generation_docs, minimum_problems, render
from lmstack.generate import generate
from lmstack.registry import register


def generate_until(model: nnx.Module, tokenizer: Tokenizer, prompts: Sequence[str], *, until: Sequence[str],
                   max_new_tokens: int, batch_size: int, max_length: int = 0) -> list[str]:
    """The greedy continuation text of each prompt, cut at eos and before the first stop
    string of ``until`` (see the module docstring). ``max_length`` 0 is the model's
    ``max_seq_len``. Raises DataError when ``max_new_tokens`` leaves no room for a prompt."""
    limit = max_length or int(model.cfg.max_seq_len)
    keep = limit - max_new_tokens
    if keep < 1:
        raise DataError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's {limit} "
                        f"positions: lower max_new_tokens")
    head = with_bos(tokenizer, [])
    encoded = []
    for p in prompts:
        ids = (head + tokenizer.encode(p))[-keep:]
        encoded.append(ids or [prefix_token(tokenizer)])
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    out: list[str] = [""] * len(prompts)
    for _, members in sorted(by_length.items()):
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            rows = [encoded[i] for i in chunk]
            rows += [rows[-1]] * (batch_size - len(rows))  # one batch shape per prompt length
            new = np.asarray(generate(model, np.asarray(rows, np.int32), max_new_tokens=max_new_tokens,
                                      rng=jax.random.key(0)))
            for r, i in enumerate(chunk):
                out[i] = cut_at_stop(tokenizer, new[r].tolist(), until)
    return out


def cut_at_stop(tokenizer: Tokenizer, ids: list[int], until: Sequence[str]) -> str:
    """The text of ``ids`` up to the first eos token, then before the first occurrence of
    any non-empty string of ``until`` (lm-eval: ``s.split(term)[0]`` for each term)."""
    if tokenizer.eos_id is not None and tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
    text = tokenizer.decode(ids)
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


# config.eval.generation (the few-shot keys: lmstack.evals.fewshot). doc_to_text / doc_to_target
# are str.format templates over a document's fields; until: stop strings (lm-eval's default is
# the few-shot delimiter); scoring: exact_match | contains | regex, with regex the pattern that
# extracts the answer; strip, regexes_to_ignore, ignore_case, ignore_punctuation: how output and
# reference are normalised before comparing (lmstack.evals.answers); limit: the first N documents
# (0: all); max_length: model positions (0: the model's max_seq_len).
GENERATION_DEFAULTS = dict(path="", fewshot_path="", doc_to_text="{question}", doc_to_target="{answer}",
                           until=("\n\n",), max_new_tokens=32, limit=0, batch_size=8, max_length=0,
                           **FEWSHOT_DEFAULTS)
DEFAULTS = dict(GENERATION_DEFAULTS, scoring="exact_match", regex="", strip=True, regexes_to_ignore=(),
                ignore_case=False, ignore_punctuation=False)


def generation_problems(section: str, settings: Any) -> list[str]:
    """Load-time errors of a generation evaluator's section ``eval.<section>``."""
    out = minimum_problems(section, settings, dict(num_fewshot=0, max_new_tokens=1, batch_size=1, limit=0,
                                                   max_length=0))
    for key in ("path", "fewshot_path"):
        path = settings[key]
        if (key == "path" or path) and not Path(path).is_file():
            out.append(f"eval.{section}.{key}={path!r} is not a file: point --config.eval.{section}.{key} at a "
                       f"JSONL file of {{\"question\": ..., \"answer\": ...}} objects")
    return out


def _problems(cfg: Any) -> list[str]:
    s = cfg.eval.generation
    out = generation_problems("generation", s)
    if s.scoring == "regex" and not s.regex:
        out.append("eval.generation.scoring='regex' needs the pattern that extracts the answer: set "
                   "--config.eval.generation.regex (e.g. '#### (\\-?[0-9.,]+)')")
    return out


def generate_answers(ctx: EvalContext, section: str) -> tuple[list[dict], list[str]]:
    """(documents, greedy outputs) of the generation evaluator configured at ``eval.<section>``."""
    s = ctx.cfg.eval[section]
    docs = generation_docs(s.path, f"eval.{section}.path")
    pool = generation_docs(s.fewshot_path, f"eval.{section}.fewshot_path") if s.fewshot_path else docs
    docs = docs[:s.limit] if s.limit else docs
    to_text = lambda d: render(s.doc_to_text, d, f"eval.{section}.doc_to_text")  # noqa: E731
    to_target = lambda d: render(s.doc_to_target, d, f"eval.{section}.doc_to_target")  # noqa: E731
    prompts = fewshot_contexts(docs, to_text, to_target, pool=pool, same_split=not s.fewshot_path,
                               num_fewshot=s.num_fewshot, fewshot_seed=s.fewshot_seed, description=s.description,
                               target_delimiter=s.target_delimiter, fewshot_delimiter=s.fewshot_delimiter)
    outputs = generate_until(ctx.model(), ctx.data.tokenizer, prompts, until=tuple(s.until),
                             max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, max_length=s.max_length)
    return docs, outputs


@register("eval.generation", config_defaults=DEFAULTS, config_choices={"scoring": SCORINGS},
          config_problems=_problems)
def generation(ctx: EvalContext) -> Iterator[tuple[str, float]]:
    """Yields the mean score over the documents, named after ``scoring`` (``exact_match``,
    ``contains`` or ``regex``)."""
    s = ctx.cfg.eval.generation
    docs, outputs = generate_answers(ctx, "generation")
    norm = dict(regex=s.regex, strip=s.strip, regexes_to_ignore=tuple(s.regexes_to_ignore),
                ignore_case=s.ignore_case, ignore_punctuation=s.ignore_punctuation)
    scores = [score_answer(out, render(s.doc_to_target, d, "eval.generation.doc_to_target"), s.scoring, **norm)
              for d, out in zip(docs, outputs)]
    yield s.scoring, float(np.mean(scores))
