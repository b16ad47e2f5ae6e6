"""Document sources: the stdlib corpus, text files, JSONL, and their error messages."""

import json
import pathlib
import sysconfig

import pydoc_data.topics
import pytest

from lmstack import registry
from lmstack.configs.base import base_config
from lmstack.data.sources import DataError, cut_to_chars, load_documents


def data_cfg(**overrides):
    cfg = base_config().data
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def test_sources_are_registered():
    assert {"stdlib", "text", "jsonl"} <= set(registry.names("data"))


def test_stdlib_cut_to_max_chars_is_deterministic():
    docs = load_documents(data_cfg(source="stdlib", max_chars=50_000))
    assert sum(map(len, docs)) == 50_000
    assert docs == load_documents(data_cfg(source="stdlib", max_chars=50_000))
    # Sorted by relative path: the first document is the first .py file in that order.
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    excluded = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"}
    relative = [p.relative_to(root) for p in root.rglob("*.py")]
    first = root / min(p.as_posix() for p in relative if not excluded & set(p.parts[:-1]))
    assert docs[0] == first.read_text(encoding="utf-8")[:50_000]


def test_stdlib_full_corpus_shape():
    docs = load_documents(data_cfg(source="stdlib"))
    topics = pydoc_data.topics.topics
    assert docs[-len(topics):] == [topics[k] for k in sorted(topics)]
    assert 5_000_000 < sum(map(len, docs)) < 30_000_000
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    excluded = root / "idlelib" / "idle.py"
    if excluded.is_file():
        assert excluded.read_text(encoding="utf-8") not in docs


def test_cut_to_chars_cuts_the_last_document_and_drops_the_rest():
    assert cut_to_chars(["abc", "defg", "hi"], 5) == ["abc", "de"]
    assert cut_to_chars(["abc", "defg"], 3) == ["abc"]
    assert cut_to_chars(["abc"], 100) == ["abc"]


def test_text_file_directory_and_glob(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "skip.md").write_text("not text")
    assert load_documents(data_cfg(source="text", path=str(tmp_path / "a.txt"))) == ["first"]
    assert load_documents(data_cfg(source="text", path=str(tmp_path))) == ["first", "second", "third"]
    assert load_documents(data_cfg(source="text", path=str(tmp_path / "[ab].txt"))) == ["first", "second"]
    assert load_documents(data_cfg(source="text", path=str(tmp_path), max_chars=8)) == ["first", "sec"]


def test_text_missing_path_says_what_to_pass(tmp_path):
    missing = str(tmp_path / "x.txt")
    with pytest.raises(DataError) as e:
        load_documents(data_cfg(source="text", path=missing))
    assert str(e.value) == (
        f"data.path: no such file or directory {missing!r}: pass --config.data.path=FILE "
        "(a txt file, a directory of .txt files, or a glob)"
    )


def test_text_unset_path_and_empty_inputs(tmp_path):
    with pytest.raises(DataError, match=r"^data\.path: not set: pass --config\.data\.path=FILE"):
        load_documents(data_cfg(source="text", path=""))
    empty = tmp_path / "x.txt"
    empty.write_text("")
    with pytest.raises(DataError, match=r"^data\.path: '.*x\.txt' is empty: point --config\.data\.path"):
        load_documents(data_cfg(source="text", path=str(empty)))
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=r"^data\.path: no \.txt files under '.*d': pass --config"):
        load_documents(data_cfg(source="text", path=str(tmp_path / "d")))
    with pytest.raises(DataError, match=r"^data\.path: no files match '.*\*\.nothing': pass"):
        load_documents(data_cfg(source="text", path=str(tmp_path / "*.nothing")))


def test_text_invalid_utf8_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\n\xff oops\n")
    with pytest.raises(DataError) as e:
        load_documents(data_cfg(source="text", path=str(bad)))
    assert str(e.value) == f"data.path: {bad}:3: not valid UTF-8 (byte 15): convert the file to UTF-8"


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_reads_field_and_skips_blank_lines(tmp_path):
    path = write_jsonl(
        tmp_path / "f.jsonl",
        [json.dumps({"text": "one", "id": 1}), "", "   ", json.dumps({"text": "two\nlines"})],
    )
    assert load_documents(data_cfg(source="jsonl", path=path)) == ["one", "two\nlines"]
    other = write_jsonl(tmp_path / "g.jsonl", [json.dumps({"body": "b"})])
    assert load_documents(data_cfg(source="jsonl", path=other, field="body")) == ["b"]


def test_jsonl_malformed_line(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [json.dumps({"text": "ok"}), "", '{"text": "a" "b"}'])
    with pytest.raises(DataError) as e:
        load_documents(data_cfg(source="jsonl", path=path))
    msg = str(e.value)
    assert msg.startswith(f"data.jsonl: {path}:3: not valid JSON (Expecting ',' delimiter")
    assert msg.endswith("): fix or delete that line")
    assert "\n" not in msg


def test_jsonl_missing_field_lists_the_fields(tmp_path):
    lines = [json.dumps({"text": "ok"})] * 2 + [json.dumps({"prompt": "p", "answer": "a"})]
    path = write_jsonl(tmp_path / "f.jsonl", lines)
    with pytest.raises(DataError) as e:
        load_documents(data_cfg(source="jsonl", path=path))
    assert str(e.value) == (
        f"data.jsonl: {path}:3: no field 'text' (fields: prompt, answer): set --config.data.field=NAME"
    )


def test_jsonl_non_string_and_non_object(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [json.dumps({"text": 3})])
    with pytest.raises(DataError) as e:
        load_documents(data_cfg(source="jsonl", path=path))
    assert str(e.value) == (
        f"data.jsonl: {path}:1: field 'text' is int, not a string: set --config.data.field to a text field"
    )
    path = write_jsonl(tmp_path / "g.jsonl", ["[1, 2]"])
    not_object = r"g\.jsonl:1: expected a JSON object, got list: write one object per line"
    with pytest.raises(DataError, match=not_object):
        load_documents(data_cfg(source="jsonl", path=path))


def test_unknown_source_and_negative_max_chars():
    with pytest.raises(DataError) as e:
        load_documents(data_cfg(source="textt"))
    assert str(e.value).startswith("data.source: unknown data 'textt': did you mean text? registered: ")
    assert str(e.value).endswith("pass --config.data.source=NAME")
    with pytest.raises(DataError, match=r"^data\.max_chars: -1 is negative: pass 0"):
        load_documents(data_cfg(source="stdlib", max_chars=-1))
