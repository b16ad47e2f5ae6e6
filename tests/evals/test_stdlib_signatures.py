"""The standard-library signatures task: deterministic, split by module, every answer what
inspect says, written once to the cache as prompt_completion JSONL."""

import importlib
import inspect
import json

import pytest

from lmstack.configs.base import base_config
from lmstack.data.formats import load_records
from lmstack.evals.stdlib_signatures import (MAX_SIGNATURE, MODULES, QUESTION, heldout_modules, required_parameters,
                                             signature_files, signature_task)


@pytest.fixture(scope="module")
def splits():
    return {split: signature_task(split) for split in ("train", "test")}


def test_deterministic_and_split_by_module(splits):
    train, test = splits["train"], splits["test"]
    assert train == signature_task("train") and test == signature_task("test")
    held = heldout_modules(n_heldout=13, seed=0)
    assert len(held) == 13 and set(held) <= set(MODULES)
    assert {r["module"] for r in test} == set(held)  # every held-out module has questions
    assert {r["module"] for r in train}.isdisjoint(held)
    assert len(train) > 400 and len(test) > 60  # Python 3.11: 479 and 87
    assert max(sum(r["module"] == m for r in train) for m in MODULES) == 10  # per_module caps each module
    other = signature_task("test", seed=1)
    assert {r["module"] for r in other} != set(held)  # the seed chooses the held-out modules


def test_answers_are_the_parameters_without_defaults(splits):
    for row in splits["train"] + splits["test"]:
        fn = getattr(importlib.import_module(row["module"]), row["function"])
        signature = inspect.signature(fn)
        assert row["prompt"] == QUESTION.format(module=row["module"], name=row["function"], signature=signature)
        assert len(str(signature)) <= MAX_SIGNATURE
        required = [n for n, p in signature.parameters.items() if p.default is p.empty and p.kind not in
                    (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert row["completion"] == (", ".join(required) if required else "none")


def test_required_parameters_by_kind():
    def f(a, /, b, c=1, *args, d, e=2, **kwargs):
        pass

    def g(*args, x=0, **kwargs):
        pass

    assert required_parameters(inspect.signature(f)) == "a, b, d"
    assert required_parameters(inspect.signature(g)) == "none"
    with pytest.raises(ValueError, match="^stdlib_signatures split='val': unknown; choose one of train, test$"):
        signature_task("val")


def test_files_hold_the_splits_and_read_as_prompt_completion(tmp_path, monkeypatch, splits):
    monkeypatch.setenv("LMSTACK_CACHE", str(tmp_path))
    paths = signature_files()
    assert paths["train"].parent.parent == tmp_path / "tasks" and "heldout13-per10-seed0" in paths["train"].parent.name
    for split, rows in splits.items():
        lines = [json.loads(line) for line in paths[split].read_text().splitlines()]
        assert lines == [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    d = base_config().data
    d.source, d.path = "prompt_completion", str(paths["test"])
    records = load_records(d)
    assert records[0].messages == [{"role": "user", "content": splits["test"][0]["prompt"]},
                                   {"role": "assistant", "content": splits["test"][0]["completion"]}]
