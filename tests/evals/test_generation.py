"""Greedy generation until stop strings, the generation and gsm8k evaluators, against greedy
decoding by full forward passes."""

import json

import numpy as np
import pytest

from lmstack.data.sources import DataError
from lmstack.evals.base import run_evaluators
from lmstack.evals.generation import generate_answers, generate_until
from lmstack.evals.gsm8k import gsm8k_scores
from tests.evals.helpers import eval_context
from tests.evals.reference import SEQ_LEN, lm_eval_contexts

N_NEW = 8


def expected_text(reference, tokenizer, prompt: str, until=(), n_new=N_NEW) -> str:
    """lm-eval's generate_until: the prompt's last SEQ_LEN - n_new tokens, greedy tokens up to
    eos, decoded, cut at the earliest stop string."""
    ids = ([tokenizer.bos_id] + list(prompt.encode()))[-(SEQ_LEN - n_new):]
    new = reference.greedy(ids, n_new)
    if tokenizer.eos_id in new:
        new = new[:new.index(tokenizer.eos_id)]
    text = tokenizer.decode(new)
    cuts = [text.find(s) for s in until if s and s in text]
    return text[:min(cuts)] if cuts else text


def test_generate_until_matches_greedy_recomputation(model, tokenizer, reference):
    prompts = ["The king said", "The earl said", "The duke said", "x" * 100]  # 14 tokens with bos; 101 cut to 56
    plain = [expected_text(reference, tokenizer, p) for p in prompts]
    stop = plain[0][2:4]  # a string the first output contains: it is cut before it
    assert generate_until(model, tokenizer, prompts, until=(), max_new_tokens=N_NEW, batch_size=2) == plain
    got = generate_until(model, tokenizer, prompts, until=("never there", stop), max_new_tokens=N_NEW, batch_size=2)
    assert got == [expected_text(reference, tokenizer, p, ("never there", stop)) for p in prompts]
    assert got[0] == plain[0][:plain[0].find(stop)] and len(got[0]) < len(plain[0])
    with pytest.raises(DataError) as e:
        generate_until(model, tokenizer, prompts, until=(), max_new_tokens=SEQ_LEN, batch_size=2)
    assert str(e.value) == ("max_new_tokens=64 leaves no room for a prompt in the model's 64 positions: lower "
                            "max_new_tokens")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_generation_evaluator_scores(model, tokenizer, reference, tmp_path):
    questions = ["The king said", "The duke said", "The earl said"]
    outs = [expected_text(reference, tokenizer, q, ("\n\n",)) for q in questions]
    answers = [f" {outs[0].strip()} ", "zzz", outs[2] + "!"]  # right; wrong; right only by `contains`
    path = _jsonl(tmp_path / "g.jsonl", [{"question": q, "answer": a} for q, a in zip(questions, answers)])
    settings = dict(path=path, max_new_tokens=N_NEW, batch_size=2)
    exact = run_evaluators(eval_context(model, tokenizer, "generation", **settings))
    assert exact == {"generation/exact_match": pytest.approx(1 / 3)}
    contains = run_evaluators(eval_context(model, tokenizer, "generation", scoring="contains", **settings))
    answers_in = [answers[0].strip() in outs[0].strip(), False, (outs[2] + "!") in outs[2].strip()]
    assert contains == {"generation/contains": pytest.approx(np.mean(answers_in))}


def test_gsm8k_prompts_outputs_and_scores(model, tokenizer, reference, tmp_path):
    test = [{"question": f"Tom has {i} apples and buys {i + 2}. How many?", "answer": f"{i}+{i + 2}\n#### {2 * i + 2}"}
            for i in range(3)]
    train = [{"question": f"What is {i} times 3?", "answer": f"{i}*3={3 * i}\n#### {3 * i}"} for i in range(6)]
    settings = dict(path=_jsonl(tmp_path / "test.jsonl", test), fewshot_path=_jsonl(tmp_path / "train.jsonl", train),
                    num_fewshot=2, max_new_tokens=N_NEW, limit=2, batch_size=2)
    ctx = eval_context(model, tokenizer, "gsm8k", **settings)
    docs, outputs = generate_answers(ctx, "gsm8k")
    prompts = lm_eval_contexts(test[:2], lambda d: f"Question: {d['question']}\nAnswer:", lambda d: d["answer"],
                               pool=train, n=2, seed=1234, same_split=False)
    assert prompts[0].startswith("Question: What is ") and prompts[0].endswith(
        "\n\nQuestion: Tom has 0 apples and buys 2. How many?\nAnswer:")
    until = ("Question:", "</s>", "<|im_end|>")
    assert docs == test[:2] and outputs == [expected_text(reference, tokenizer, p, until) for p in prompts]
    scores = [gsm8k_scores(o, d["answer"]) for o, d in zip(outputs, docs)]
    assert run_evaluators(ctx) == {f"gsm8k/{m}": np.mean([s[m] for s in scores])
                                   for m in ("strict_match", "flexible_extract")}
