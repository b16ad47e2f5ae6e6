"""Preference data formats: ``preference`` (ShareGPT ranking pairs and prompt/chosen/rejected
JSONL) and ``kto`` (unpaired, labelled) parse the real demo files and small files written
here; bad input is one line naming the file and the record."""

from __future__ import annotations

import json

import pytest

from lmstack.configs.base import base_config
from lmstack.data.formats import PreferencePair, Unpaired, load_records, record_type
from lmstack.data.sources import DataError, load_documents


def _cfg(source: str, path):
    c = base_config().data
    c.source, c.path = source, str(path)
    return c


def _write(path, rows):
    text = "".join(json.dumps(r) + "\n" for r in rows) if path.suffix == ".jsonl" else json.dumps(rows)
    path.write_text(text)
    return path


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


@pytest.mark.shared_data
def test_dpo_en_demo_pairs(shared_data):
    path = shared_data / "preference" / "dpo_en_demo.json"
    records = load_records(_cfg("preference", path))
    raw = json.loads(path.read_text())
    assert len(records) == 300 and all(isinstance(r, PreferencePair) for r in records)
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    for r, row in zip(records, raw):
        assert r.prompt == [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]
        assert r.chosen == _assistant(row["chosen"]["value"]) and r.rejected == _assistant(row["rejected"]["value"])
        assert r.prompt[-1]["role"] == "user" and r.margin is None
    assert records[1].prompt[0]["role"] == "system" and records[1].where == f"{path} record 2"
    assert record_type("preference") is PreferencePair


@pytest.mark.shared_data
def test_kto_en_demo_examples(shared_data):
    path = shared_data / "preference" / "kto_en_demo.json"
    records = load_records(_cfg("kto", path))
    raw = json.loads(path.read_text())
    assert len(records) == 300 and all(isinstance(r, Unpaired) for r in records)
    assert [r.desirable for r in records] == [row["label"] for row in raw]
    assert sum(r.desirable for r in records) == 150
    assert all(r.messages == row["messages"] and r.messages[-1]["role"] == "assistant" for r, row in zip(records, raw))
    assert record_type("kto") is Unpaired


def test_prompt_chosen_rejected_jsonl_strings_and_messages(tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "system", "content": "Be brief."}, _user("Hi")], "chosen": [_assistant("Hello")],
         "rejected": [_assistant("Go away")], "margin": 2},
    ])
    a, b = load_records(_cfg("preference", path))
    assert a == PreferencePair([_user("2+2?")], _assistant("4"), _assistant("5"), None, f"{path}:1")
    assert b.prompt == [{"role": "system", "content": "Be brief."}, _user("Hi")]
    assert (b.chosen, b.rejected, b.margin, b.where) == (_assistant("Hello"), _assistant("Go away"), 2.0, f"{path}:2")
    # the documents (for a tokenizer) are the prompt and both replies
    assert load_documents(_cfg("preference", path)) == ["2+2?\n\n4\n\n5", "Be brief.\n\nHi\n\nHello\n\nGo away"]


def test_kto_prompt_completion_jsonl(tmp_path):
    path = _write(tmp_path / "kto.jsonl", [{"prompt": "Hi", "completion": "Hello", "label": True},
                                           {"prompt": "Hi", "completion": "Bye", "label": False}])
    good, bad = load_records(_cfg("kto", path))
    assert good == Unpaired([_user("Hi"), _assistant("Hello")], True, f"{path}:1")
    assert bad.messages[-1] == _assistant("Bye") and bad.desirable is False


@pytest.mark.parametrize("row, message", [
    ({"conversations": [{"from": "human", "value": "Hi"}], "rejected": {"from": "gpt", "value": "no"}},
     "preference: {where}: no 'chosen' reply (fields: conversations, rejected): a pair needs both a chosen and a "
     "rejected reply: add it or drop the record"),
    ({"prompt": "Hi", "chosen": "yes"},
     "preference: {where}: no 'rejected' reply (fields: prompt, chosen): a pair needs both a chosen and a rejected "
     "reply: add it or drop the record"),
    ({"prompt": "Hi", "chosen": "same", "rejected": "same"},
     "preference: {where}: 'chosen' and 'rejected' are the same reply, so the pair prefers nothing: drop the record "
     "or fix one of the replies"),
    ({"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "a"}},
     "preference: {where}: 'chosen' and 'rejected' are the same reply, so the pair prefers nothing: drop the record "
     "or fix one of the replies"),
    ({"prompt": [_user("Hi"), _assistant("Hello")], "chosen": "a", "rejected": "b"},
     "preference: {where}: the prompt ends with a message of role 'assistant': it must end with the user message the replies "
     "answer"),
    ({"prompt": "Hi", "chosen": {"from": "human", "value": "a"}, "rejected": "b"},
     "preference: {where}: 'chosen' is a user message: the reply must be the assistant's (from gpt / role "
     "assistant)"),
    ({"prompt": "Hi", "chosen": [_assistant("a"), _assistant("b")], "rejected": "b"},
     "preference: {where}: 'chosen' holds 2 messages: give one assistant reply (a string or a single message)"),
])
def test_bad_pairs_name_the_record(tmp_path, row, message):
    path = _write(tmp_path / "pairs.json", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError) as e:
        load_records(_cfg("preference", path))
    assert str(e.value) == message.format(where=f"{path} record 2")


@pytest.mark.parametrize("row, message", [
    ({"messages": [_user("Hi"), _assistant("Hello")], "label": "yes"},
     "kto: {where}: field 'label' is str, not bool: fix the record"),
    ({"messages": [_user("Hi")], "label": True},
     "kto: {where}: the conversation does not end with an assistant message: the last message is the reply the "
     "label judges"),
])
def test_bad_kto_examples_name_the_record(tmp_path, row, message):
    path = _write(tmp_path / "kto.jsonl", [row])
    with pytest.raises(DataError) as e:
        load_records(_cfg("kto", path))
    assert str(e.value) == message.format(where=f"{path}:1")
