"""Multiple choice: acc / acc_norm / acc_bytes selection against lm-eval's formulas, and the
evaluator end to end against per-choice log-likelihoods from a full forward pass."""

import numpy as np
import pytest

from lmstack.evals.base import run_evaluators
from lmstack.evals.loglikelihood import encode_pair
from lmstack.evals.multiple_choice import choice_predictions, multiple_choice_metrics
from lmstack.evals.stdlib_docstrings import stdlib_docstrings
from tests.evals.helpers import eval_context
from tests.evals.reference import lm_eval_contexts


def test_acc_and_acc_norm_disagree_on_length():
    # raw: "a" (-2 > -4); per character: "bbbb" (-4/4 = -1 > -2/1)
    assert choice_predictions([-2.0, -4.0], ["a", "bbbb"]) == {"acc": 0, "acc_norm": 1, "acc_bytes": 1}


def test_acc_bytes_counts_utf8_bytes():
    # "é" is 1 character but 2 bytes: per character -3/1 < -4/2, per byte -3/2 > -4/2
    assert choice_predictions([-3.0, -4.0], ["é", "ab"]) == {"acc": 0, "acc_norm": 1, "acc_bytes": 0}
    # ties go to the first choice (np.argmax)
    assert choice_predictions([-1.0, -1.0], ["x", "y"])["acc"] == 0


def test_metrics_average_over_documents():
    docs = [{"choices": ["a", "bbbb"], "gold": 1}, {"choices": ["é", "ab"], "gold": 0},
            {"choices": ["x", "y", "z"], "gold": 2}]
    lps = [[-2.0, -4.0], [-3.0, -4.0], [-5.0, -6.0, -1.0]]
    assert multiple_choice_metrics(lps, docs) == pytest.approx({"acc": 2 / 3, "acc_norm": 2 / 3, "acc_bytes": 3 / 3})


def test_evaluator_matches_per_choice_forward_passes(model, tokenizer, reference):
    ctx = eval_context(model, tokenizer, "multiple_choice", limit=6, num_fewshot=1, batch_size=3)
    got = run_evaluators(ctx)
    all_docs = stdlib_docstrings()
    docs = all_docs[:6]
    prompts = lm_eval_contexts(docs, lambda d: d["query"], lambda d: d["choices"][d["gold"]], pool=all_docs, n=1,
                               seed=1234, same_split=True)
    hits = {"acc": [], "acc_norm": []}
    for prompt, doc in zip(prompts, docs):
        ll = np.array([reference.logprob(*encode_pair(tokenizer, prompt, " " + c))[0] for c in doc["choices"]])
        hits["acc"].append(np.argmax(ll) == doc["gold"])
        hits["acc_norm"].append(np.argmax(ll / np.array([len(c) for c in doc["choices"]])) == doc["gold"])
    assert got == {"multiple_choice/acc": np.mean(hits["acc"]), "multiple_choice/acc_norm": np.mean(hits["acc_norm"]),
                   "multiple_choice/acc_bytes": np.mean(hits["acc_norm"])}  # function names are ASCII
