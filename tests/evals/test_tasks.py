"""Task files (JSONL) and the built-in stdlib_docstrings task."""

import importlib
import inspect
import json

import pytest

from lmstack.data.sources import DataError
from lmstack.evals.stdlib_docstrings import MODULES, stdlib_docstrings
from lmstack.evals.tasks import generation_docs, multiple_choice_docs


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_multiple_choice_jsonl(tmp_path):
    p = _write(tmp_path / "mc.jsonl", [{"context": "2+2=", "choices": ["3", "4"], "gold": 1}, "",
                                       {"query": "Sky?", "choices": ["blue", "red", "green"], "gold": 0, "id": 7}])
    assert multiple_choice_docs(p, "eval.multiple_choice.path") == [
        {"query": "2+2=", "choices": ["3", "4"], "gold": 1}, {"query": "Sky?", "choices": ["blue", "red", "green"],
                                                              "gold": 0}]


@pytest.mark.parametrize("row,message", [
    ('{"query": "q", "choices": ["a", "b"]}', "{p}:1: no field 'gold' (it has choices, query)"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "{p}:1: 'gold' is 2, not an index of its 2 choices (0..1)"),
    ('{"query": "q", "choices": ["a", ""], "gold": 0}',
     "{p}:1: 'choices' must be a list of at least 2 non-empty strings"),
    ('{"query": "q", "choices": "ab", "gold": 0}', "{p}:1: field 'choices' is a str, not a list"),
    ('{"query": "q", "choices": ["a", "b"], "gold": true}', "{p}:1: field 'gold' is a bool, not a int"),
    ('{"query": "q",', "{p}:1: not JSON (Expecting property name enclosed in double quotes): write one JSON object "
                      "per line"),
    ('["q"]', "{p}:1: a list, not a JSON object: write one object per line"),
])
def test_bad_multiple_choice_rows(tmp_path, row, message):
    p = _write(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError) as e:
        multiple_choice_docs(p, "eval.multiple_choice.path")
    assert str(e.value) == message.format(p=p)


def test_generation_jsonl_and_missing_files(tmp_path):
    p = _write(tmp_path / "g.jsonl", [{"question": "2+2?", "answer": "4", "extra": 1}])
    assert generation_docs(p, "eval.generation.path") == [{"question": "2+2?", "answer": "4", "extra": 1}]
    p = _write(tmp_path / "g2.jsonl", [{"question": "2+2?"}])
    with pytest.raises(DataError) as e:
        generation_docs(p, "eval.generation.path")
    assert str(e.value) == f"{p}:1: no field 'answer' (it has question)"
    with pytest.raises(DataError) as e:
        generation_docs(tmp_path / "none.jsonl", "eval.gsm8k.path")
    assert str(e.value) == (f"eval.gsm8k.path: no file {str(tmp_path / 'none.jsonl')!r}: point --config.eval.gsm8k.path "
                            f"at a JSONL file")


def test_stdlib_docstrings_task():
    docs = stdlib_docstrings()
    assert docs == stdlib_docstrings() and docs != stdlib_docstrings(seed=1)  # deterministic, seeded
    assert len(docs) > 100
    golds = [d["gold"] for d in docs]
    assert all(golds.count(g) > len(docs) // 8 for g in range(4))  # the answer's place is spread out
    for doc in docs:
        module_name, first_line = (line.split(": ", 1)[1] for line in doc["query"].split("\n")[:2])
        assert module_name in MODULES and doc["query"].endswith("\nFunction:")
        module = importlib.import_module(module_name)
        assert len(set(doc["choices"])) == 4 and all(inspect.isfunction(getattr(module, c)) for c in doc["choices"])
        assert inspect.getdoc(getattr(module, doc["choices"][doc["gold"]])).strip().splitlines()[0] == first_line
        others = [inspect.getdoc(getattr(module, c)) or "" for i, c in enumerate(doc["choices"]) if i != doc["gold"]]
        assert all(not o.strip() or o.strip().splitlines()[0].strip() != first_line for o in others)
