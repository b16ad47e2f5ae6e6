"""Few-shot prompts, assembled as lm-evaluation-harness does (``ContextSampler.get_context``).

A prompt is ``description + shot_1 + ... + shot_n + doc_text`` where each shot is
``shot_text + target_delimiter + shot_target + fewshot_delimiter`` (lm-eval defaults: target
delimiter ``" "``, few-shot delimiter ``"\\n\\n"``; the description is prepended as given, so
it carries its own separator). Shots are drawn by one ``random.Random(seed)`` consumed in
document order (lm-eval's ``fewshot_random_seed``, default 1234): ``n + 1`` candidates when
the shots come from the evaluated documents themselves, ``n`` from a separate pool, then any
shot equal to the document is dropped and the first ``n`` kept.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

# The few-shot keys every prompting evaluator's config section has (eval.NAME.*).
FEWSHOT_DEFAULTS = dict(num_fewshot=0, fewshot_seed=1234, description="", target_delimiter=" ",
                        fewshot_delimiter="\n\n")


def fewshot_contexts(docs: Sequence[dict], doc_to_text: Callable[[dict], str], doc_to_target: Callable[[dict], str],
                     *, num_fewshot: int, fewshot_seed: int, description: str = "", target_delimiter: str = " ",
                     fewshot_delimiter: str = "\n\n", pool: Sequence[dict], same_split: bool) -> list[str]:
    """The prompt of each document of ``docs``: shots from ``pool`` (``same_split``: the
    pool holds the evaluated documents, so one more candidate is drawn), never the document
    itself, then the document's own text."""
    rnd = random.Random(fewshot_seed)
    out = []
    for doc in docs:
        shots: list[dict] = []
        if num_fewshot:
            n = min(num_fewshot + same_split, len(pool))
            shots = [pool[i] for i in rnd.sample(range(len(pool)), n) if pool[i] != doc][:num_fewshot]
        head = "".join(doc_to_text(s) + target_delimiter + doc_to_target(s) + fewshot_delimiter for s in shots)
        out.append(description + head + doc_to_text(doc))
    return out
