"""GSM8K as lm-evaluation-harness's ``gsm8k`` task (``lm_eval/tasks/gsm8k/gsm8k.yaml``).

Prompt ``"Question: {question}\\nAnswer:"``, 5 shots from the train split (target: the whole
worked answer), stop strings ``"Question:"``, ``"</s>"``, ``"<|im_end|>"``, greedy decoding
(:mod:`lmstack.evals.generation`). Two answers are taken from each output and both reported:

- ``strict_match`` (lm-eval ``exact_match,strict-match``): the first ``#### (\\-?[0-9\\.\\,]+)``;
- ``flexible_extract`` (lm-eval ``exact_match,flexible-extract``): the last match of
  ``(-?[$0-9.,]{2,})|(-?[0-9]+)``, any number in the output.

Each is compared with the reference answer after lm-eval's ``regexes_to_ignore``
(``,`` ``\\$`` ``(?s).*#### `` ``\\.$``: commas, dollar signs, the worked solution before
``#### `` and a trailing full stop removed) and ``ignore_case``.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from lmstack.evals.answers import normalise_answer, regex_extract
from lmstack.evals.base import EvalContext
from lmstack.evals.generation import GENERATION_DEFAULTS, generate_answers, generation_problems
from lmstack.registry import register

STRICT = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")

DEFAULTS = dict(GENERATION_DEFAULTS, path="../shared/data/gsm8k/test.jsonl",
                fewshot_path="../shared/data/gsm8k/train.jsonl", num_fewshot=5,
                doc_to_text="Question: {question}\nAnswer:", until=("Question:", "</s>", "<|im_end|>"),
                max_new_tokens=256)


def gsm8k_number(text: str) -> str:
    """A GSM8K answer as compared: lm-eval's ``regexes_to_ignore`` removed, lower case."""
    return normalise_answer(text, regexes_to_ignore=IGNORE, ignore_case=True)


def gsm8k_scores(output: str, answer: str) -> dict[str, float]:
    """``strict_match`` and ``flexible_extract`` (1.0 or 0.0) of one generated ``output``
    against the dataset's ``answer`` (worked solution ending ``#### N``)."""
    ref = gsm8k_number(answer)
    return {"strict_match": float(gsm8k_number(regex_extract(output, STRICT)) == ref),
            "flexible_extract": float(gsm8k_number(regex_extract(output, FLEXIBLE, group_select=-1)) == ref)}


def _problems(cfg: Any) -> list[str]:
    return generation_problems("gsm8k", cfg.eval.gsm8k)


@register("eval.gsm8k", config_defaults=DEFAULTS, config_problems=_problems)
def gsm8k(ctx: EvalContext) -> Iterator[tuple[str, float]]:
    """Yields mean ``strict_match`` and ``flexible_extract`` over the documents."""
    docs, outputs = generate_answers(ctx, "gsm8k")
    scores = [gsm8k_scores(out, doc["answer"]) for doc, out in zip(docs, outputs)]
    for metric in ("strict_match", "flexible_extract"):
        yield metric, float(np.mean([s[metric] for s in scores]))
