"""Each evaluator's eval.NAME section: its defaults, and one-line errors for settings it cannot use."""

import pytest

from lmstack.config import ConfigError, compose, validate
from lmstack.configs.base import base_config


def _composed(name, **settings):
    c = base_config()
    c.eval.names = (name,)
    c.eval[name] = settings
    return compose(c)


def _error(name, **settings) -> str:
    with pytest.raises(ConfigError) as e:
        validate(_composed(name, **settings))
    return str(e.value)


def test_sections_have_lm_eval_defaults():
    mc = _composed("multiple_choice").eval.multiple_choice
    assert (mc.task, mc.num_fewshot, mc.fewshot_seed, mc.target_delimiter, mc.fewshot_delimiter) == (
        "stdlib_docstrings", 0, 1234, " ", "\n\n")
    gsm = _composed("gsm8k").eval.gsm8k
    assert (gsm.num_fewshot, gsm.doc_to_text, gsm.until, gsm.max_new_tokens) == (
        5, "Question: {question}\nAnswer:", ("Question:", "</s>", "<|im_end|>"), 256)
    assert _composed("generation").eval.generation.until == ("\n\n",)


def test_multiple_choice_problems(tmp_path):
    assert _error("multiple_choice", task="jsonl") == (
        "invalid config: eval.multiple_choice.path='' is not a file: point --config.eval.multiple_choice.path at a "
        "JSONL file of {\"query\": ..., \"choices\": [...], \"gold\": N} objects")
    assert _error("multiple_choice", path=str(tmp_path)) == (
        "invalid config: eval.multiple_choice.path is set but task='stdlib_docstrings' is built in: set "
        "--config.eval.multiple_choice.task=jsonl to read the file, or drop the path")
    assert _error("multiple_choice", task="hellaswag", batch_size=0) == (
        "invalid config: eval.multiple_choice.task is 'hellaswag': must be one of stdlib_docstrings, jsonl; "
        "eval.multiple_choice.batch_size=0 must be at least 1: set --config.eval.multiple_choice.batch_size")


def test_generation_and_gsm8k_problems(tmp_path):
    assert _error("generation", scoring="regex") == (
        "invalid config: eval.generation.path='' is not a file: point --config.eval.generation.path at a JSONL file "
        "of {\"question\": ..., \"answer\": ...} objects; eval.generation.scoring='regex' needs the pattern that "
        "extracts the answer: set --config.eval.generation.regex (e.g. '#### (\\-?[0-9.,]+)')")
    path = tmp_path / "g.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n')
    assert _error("generation", path=str(path), scoring="fuzzy") == (
        "invalid config: eval.generation.scoring is 'fuzzy': must be one of exact_match, contains, regex")
    assert _error("gsm8k", path=str(path), fewshot_path=str(path), num_fewshot=-1) == (
        "invalid config: eval.gsm8k.num_fewshot=-1 must be at least 0: set --config.eval.gsm8k.num_fewshot")
    assert _error("gsm8k", path=str(path), fewshot_path=str(tmp_path / "none")) == (
        f"invalid config: eval.gsm8k.fewshot_path={str(tmp_path / 'none')!r} is not a file: point "
        f"--config.eval.gsm8k.fewshot_path at a JSONL file of {{\"question\": ..., \"answer\": ...}} objects")
    with pytest.raises(ConfigError) as e:
        _composed("gsm8k", scoring="exact_match")
    assert str(e.value).startswith("the config sets eval.gsm8k.scoring, which eval.gsm8k does not have: its keys "
                                   "are batch_size, description, doc_to_target, ")
