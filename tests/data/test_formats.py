"""Data formats: each parses the real files in ../shared/data and small files written here;
bad input is a one-line DataError naming the file and the record or line."""

from __future__ import annotations

import json

import pytest

from lmstack.config import ConfigError
from lmstack.configs.base import base_config
from lmstack.data.formats import Conversation, Labelled, load_records, record_type, split_records
from lmstack.data.sources import DataError, load_documents


def _cfg(source: str, path, **data):
    c = base_config().data
    c.source, c.path = source, str(path)
    c.update(data)
    return c


def _write(path, rows, jsonl=False):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows))
    return path


# --- real files ---------------------------------------------------------------------


@pytest.mark.shared_data
def test_alpaca_real_files(shared_data):
    records = load_records(_cfg("alpaca", shared_data / "instruct" / "alpaca_en_demo.json"))
    assert len(records) == 999 and all(isinstance(r, Conversation) for r in records)
    raw = json.loads((shared_data / "instruct" / "alpaca_en_demo.json").read_text())
    for r, row in zip(records, raw):
        user = "\n".join(s for s in (row["instruction"], row["input"]) if s)
        assert r.messages == [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    with_input = next(i for i, row in enumerate(raw) if row["input"])
    assert records[with_input].messages[0]["content"] == raw[with_input]["instruction"] + "\n" + raw[with_input]["input"]
    identity = load_records(_cfg("alpaca", shared_data / "instruct" / "identity.json"))
    assert len(identity) == 91 and identity[0].messages[0] == {"role": "user", "content": "hi"}
    assert identity[0].where.endswith("identity.json record 1")


@pytest.mark.shared_data
def test_sharegpt_real_files(shared_data):
    kto = load_records(_cfg("sharegpt", shared_data / "preference" / "kto_en_demo.json"))  # messages/role/content
    raw = json.loads((shared_data / "preference" / "kto_en_demo.json").read_text())
    assert len(kto) == 300 and [r.messages for r in kto] == [row["messages"] for row in raw]
    dpo = load_records(_cfg("sharegpt", shared_data / "preference" / "dpo_en_demo.json"))  # conversations/from/value
    raw = json.loads((shared_data / "preference" / "dpo_en_demo.json").read_text())
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    assert len(dpo) == 300
    assert [r.messages for r in dpo] == [[{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]
                                         for row in raw]


@pytest.mark.shared_data
def test_prompt_completion_real_file(shared_data):
    path = shared_data / "gsm8k" / "test.jsonl"
    records = load_records(_cfg("prompt_completion", path, prompt_field="question", completion_field="answer"))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 1319
    assert records[5].messages == [{"role": "user", "content": rows[5]["question"]},
                                   {"role": "assistant", "content": rows[5]["answer"]}]
    assert records[5].where == f"{path}:6"


@pytest.mark.shared_data
def test_classification_real_files(shared_data):
    dev = load_records(_cfg("classification", shared_data / "sst2" / "dev.tsv", field="content"))
    assert len(dev) == 872 and all(isinstance(r, Labelled) for r in dev)
    assert dev[0] == Labelled("one long string of cliches .", "0", f"{shared_data / 'sst2' / 'dev.tsv'}:2")
    train = load_records(_cfg("classification", shared_data / "sst2" / "train.tsv", field="sentence"))  # CRLF
    assert len(train) == 67_349 and {r.label for r in train} == {"0", "1"}
    assert not any(r.text.endswith("\r") or r.label.endswith("\r") for r in train)


# --- small files --------------------------------------------------------------------


def test_alpaca_system_history_and_jsonl(tmp_path):
    row = {"instruction": "Add them.", "input": "2 and 3", "output": "5", "system": "You add.",
           "history": [["Hi", "Hello"], ["Ready?", "Yes"]]}
    want = [{"role": "system", "content": "You add."},
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Ready?"}, {"role": "assistant", "content": "Yes"},
            {"role": "user", "content": "Add them.\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert load_records(_cfg("alpaca", _write(tmp_path / "a.json", [row])))[0].messages == want
    got = load_records(_cfg("alpaca", _write(tmp_path / "a.jsonl", [row, {"instruction": "x", "output": "y"}], True)))
    assert [r.messages for r in got] == [want, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]]
    assert got[1].where == f"{tmp_path / 'a.jsonl'}:2"


def test_sharegpt_system_field(tmp_path):
    rows = [{"system": "S", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    assert load_records(_cfg("sharegpt", _write(tmp_path / "s.jsonl", rows, True)))[0].messages == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_classification_csv_and_jsonl(tmp_path):
    (tmp_path / "d.csv").write_text('label,text\npos,"good, very good"\n\nneg,bad\n')
    assert load_records(_cfg("classification", tmp_path / "d.csv")) == [
        Labelled("good, very good", "pos", f"{tmp_path / 'd.csv'}:2"), Labelled("bad", "neg", f"{tmp_path / 'd.csv'}:4")]
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": True}, {"text": "c", "label": "x"}]
    assert [r.label for r in load_records(_cfg("classification", _write(tmp_path / "d.jsonl", rows, True)))] == [
        "1", "true", "x"]


def test_formats_are_document_sources_and_record_types(tmp_path):
    path = _write(tmp_path / "a.json", [{"instruction": "Q", "output": "A"}])
    assert load_documents(_cfg("alpaca", path)) == ["Q\n\nA"]  # for tokenizer training / pre-training
    assert record_type("sharegpt") is Conversation and record_type("classification") is Labelled


def test_split_records_is_seeded_and_keeps_order():
    records = [Labelled(str(i), "0") for i in range(20)]
    train, val = split_records(records, 0.25, seed=3)
    assert len(val) == 5 and len(train) == 15 and sorted(train + val, key=lambda r: int(r.text)) == records
    assert [int(r.text) for r in train] == sorted(int(r.text) for r in train)
    assert split_records(records, 0.25, seed=3) == (train, val) and split_records(records, 0.25, seed=4) != (train, val)
    assert split_records(records[:3], 0.01, seed=0)[1] != []  # any val_fraction > 0 holds a record out
    with pytest.raises(DataError, match=r"^data.val_fraction: 0.5 of 1 records leaves none for training: "):
        split_records(records[:1], 0.5, seed=0)


# --- bad input ----------------------------------------------------------------------


def _error(source, path, **data) -> str:
    with pytest.raises(DataError) as e:
        load_records(_cfg(source, path, **data))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_input_messages(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    assert _error("alpaca", empty) == f"data.path: {empty} is empty: point --config.data.path at a file with records"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": oops}\n')
    assert _error("alpaca", bad) == (f"data.path: {bad}:3: not valid JSON (Expecting value at column 17): "
                                     f"fix or delete that line")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a",\n "output": }]')
    assert _error("alpaca", broken).startswith(f"data.path: {broken} line 2: not valid JSON (Expecting value")
    obj = _write(tmp_path / "obj.json", {"instruction": "a"})
    assert _error("alpaca", obj) == (f"data.path: {obj}: expected a JSON list of records, got dict: "
                                     "write [{...}, {...}] or one record per line in a .jsonl file")
    missing = _write(tmp_path / "m.json", [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": ""}])
    assert _error("alpaca", missing) == (f"alpaca: {missing} record 2: no field 'output' (fields: instruction, "
                                         f"input): add it or choose the matching data.source")
    typed = _write(tmp_path / "t.json", [{"instruction": "a", "output": 3}])
    assert _error("alpaca", typed) == f"alpaca: {typed} record 1: field 'output' is int, not str: fix the record"
    role = _write(tmp_path / "r.json", [{"conversations": [{"from": "human", "value": "q"},
                                                           {"from": "bot", "value": "a"}]}])
    assert _error("sharegpt", role) == (f"sharegpt: {role} record 1 message 2: unknown role 'bot' in "
                                        f"'conversations': use human/gpt/system")
    role2 = _write(tmp_path / "r2.jsonl", [{"messages": [{"role": "tool", "content": "x"}]}], jsonl=True)
    assert _error("sharegpt", role2) == (f"sharegpt: {role2}:1 message 1: unknown role 'tool' in 'messages': "
                                         f"use system/user/assistant")
    pc = _write(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p"}], jsonl=True)
    assert _error("prompt_completion", pc) == (f"prompt_completion: {pc}:2: no field 'completion' (fields: prompt): "
                                               f"add it or choose the matching data.source")
    tsv = tmp_path / "d.tsv"
    tsv.write_text("label\tsentence\n1\tok\n")
    assert _error("classification", tsv) == (f"classification: {tsv}:1: the header has no column 'text' (columns: "
                                             f"label, sentence): set --config.data.field to a column name or a "
                                             f"0-based column number")
    tsv.write_text("label\ttext\n1\tok\n0\tno\textra\n")
    assert _error("classification", tsv) == f"classification: {tsv}:3: 3 columns, the header has 2: fix that line"
    assert _error("text", tsv) == ("data.source: 'text' gives documents, not records: pass one of the data formats "
                                   "alpaca, classification, kto, preference, prompt_completion, sharegpt with --config.data.path=FILE")


# --- placeholders ---------------------------------------------------------------------

IDENTITY = '{"name": "lmstack-bot", "author": "the lmstack team"}'


@pytest.mark.shared_data
def test_identity_placeholders_are_filled(shared_data):
    path = shared_data / "instruct" / "identity.json"
    raw = json.loads(path.read_text())
    records = load_records(_cfg("alpaca", path, placeholders=IDENTITY))
    for r, row in zip(records, raw):
        want = row["output"].replace("{{name}}", "lmstack-bot").replace("{{author}}", "the lmstack team")
        assert r.messages[-1]["content"] == want and "{{" not in want
    assert records[2].messages == [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am lmstack-bot, an AI assistant developed by the lmstack team. "
                                         "How can I assist you today?"}]
    assert sum("lmstack-bot" in r.messages[-1]["content"] for r in records) == sum(
        "{{name}}" in row["output"] for row in raw) == 77


def test_placeholders_fill_every_record_type_and_bad_values_are_one_line(tmp_path):
    pairs = _write(tmp_path / "p.json", [{"prompt": "Who is {{name}}?", "chosen": "{{ name }} by {{author}}",
                                          "rejected": "not {{name}}"}])
    (pair,) = load_records(_cfg("preference", pairs, placeholders=IDENTITY))
    assert (pair.prompt[0]["content"], pair.chosen["content"], pair.rejected["content"]) == (
        "Who is lmstack-bot?", "lmstack-bot by the lmstack team", "not lmstack-bot")
    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\tlabel\nI am {{name}}\t1\n")
    assert load_records(_cfg("classification", tsv, placeholders=IDENTITY))[0].text == "I am lmstack-bot"
    plain = _write(tmp_path / "a.json", [{"instruction": "{{name}}", "output": "{x}"}])
    assert load_records(_cfg("alpaca", plain))[0].messages[0]["content"] == "{{name}}"  # none set: left as is
    assert _error("alpaca", plain, placeholders='{"author": "me"}') == (
        f"data.placeholders: {plain} record 1 holds {{{{name}}}}, which data.placeholders does not set "
        f"(it sets author): add 'name' to it")
    with pytest.raises(ConfigError, match=r"^data.placeholders='\[1\]' is not a JSON object of strings: write e.g. "):
        load_records(_cfg("alpaca", plain, placeholders="[1]"))


def test_task_files_write_each_split_once_and_atomically(tmp_path, monkeypatch):
    from lmstack.data.formats import task_files

    monkeypatch.setenv("LMSTACK_CACHE", str(tmp_path))
    calls = []

    def rows(split):
        def make():
            calls.append(split)
            return [{"prompt": f"{split} é?", "completion": "ok", "extra": 1}]
        return make

    paths = task_files("demo-v1", {"train": rows("train"), "test": rows("test")})
    assert paths == {s: tmp_path / "tasks" / "demo-v1" / f"{s}.jsonl" for s in ("train", "test")}
    assert paths["train"].read_text(encoding="utf-8") == '{"prompt": "train é?", "completion": "ok"}\n'
    assert task_files("demo-v1", {"train": rows("train"), "test": rows("test")}) == paths
    assert calls == ["train", "test"]  # the second call found both files and generated nothing
    assert sorted(p.name for p in paths["train"].parent.iterdir()) == ["test.jsonl", "train.jsonl"]  # no temporaries
