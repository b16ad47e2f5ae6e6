"""Data formats: files of structured records (conversations, labelled texts), chosen by ``data.source``.

Each format is registered twice: as ``format.NAME`` (``data_cfg -> list[record]``, what the
SFT and classification objectives read) and as the document source ``data.NAME`` (the
records' texts, for training a tokenizer or for a pre-training objective on the same files).

Records:

- :class:`Conversation`: ``messages``, a list of ``{"role", "content"}`` with roles
  ``system``, ``user`` and ``assistant`` (what chat templates read).
- :class:`Labelled`: ``text`` and ``label`` (a string; JSON numbers and booleans as JSON text).
- :class:`PreferencePair`: a ``prompt`` conversation (ending with a user message), the
  ``chosen`` and the ``rejected`` assistant reply, and an optional ``margin`` (how much
  chosen is preferred; Llama 2's preference-strength margin, TRL's ``margin`` column).
- :class:`Unpaired`: a conversation whose last message is the assistant reply being judged,
  and whether it is ``desirable`` (KTO's unpaired label).

Each record keeps ``where`` (``FILE record N`` or ``FILE:LINE``) for later errors. Formats:

- ``alpaca``: JSON list (or JSONL) of ``{instruction, input?, output, system?, history?}``; the
  user turn is ``instruction`` and ``input`` joined by a newline, ``history`` is a list of
  ``[instruction, response]`` pairs before it (LLaMA-Factory's ``alpaca`` converter).
- ``sharegpt``: JSON list or JSONL of ``{"conversations": [{"from", "value"}, ...], "system"?}``
  with ``from`` in human/gpt/system (LLaMA-Factory's ``sharegpt``), or OpenAI-style
  ``{"messages": [{"role", "content"}, ...]}`` with roles user/assistant/system.
- ``prompt_completion``: JSONL of ``{data.prompt_field, data.completion_field}``: one user
  turn and one assistant turn.
- ``classification``: TSV, CSV (by suffix, header row) or JSONL with a text column
  (``data.field``) and a label column (``data.label_field``); in TSV/CSV a column is a header
  name or a 0-based column number.
- ``preference``: JSON list or JSONL of pairs, either LLaMA-Factory's ShareGPT ranking records
  ``{"conversations": [{"from", "value"}, ...], "chosen": {"from": "gpt", "value"},
  "rejected": {...}, "system"?}`` or TRL's ``{"prompt", "chosen", "rejected"}`` with
  ``prompt`` a string (one user turn) or a list of ``{"role", "content"}`` messages and each
  reply a string or a list holding one assistant message; ``margin`` (a number) optional.
  A pair without ``chosen`` or ``rejected``, or whose two replies are the same text, is an error.
- ``kto``: JSON list or JSONL of unpaired examples: LLaMA-Factory's ``{"messages": [{"role",
  "content"}, ...], "label": true/false}`` (or ShareGPT ``conversations``) whose last message
  is the judged assistant reply, or TRL's ``{"prompt", "completion", "label"}``.

``data.placeholders``, a JSON object of strings (e.g. ``{"name": "lmstack-bot"}``), fills
``{{key}}`` in every text of every record (LLaMA-Factory's ``identity.json`` writes
``{{name}}`` and ``{{author}}``); a ``{{key}}`` it does not set is then an error. Empty: texts
are left as they are.

Bad input raises :class:`lmstack.data.sources.DataError` in one line naming the file and
the record or line.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import pathlib
import re
from typing import Any, Callable, Iterable, Iterator

import ml_collections as mlc
import numpy as np

from lmstack.config import ConfigError
from lmstack.data.sources import DataError, read_utf8, resolve_paths
from lmstack.data.tokenizers import cache_dir, write_atomic
from lmstack.registry import lookup, names, register

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A conversation: ``messages`` is a list of ``{"role", "content"}`` dicts (roles in :data:`ROLES`)."""

    messages: list[dict[str, str]]
    where: str = ""

    def text(self) -> str:
        return "\n\n".join(m["content"] for m in self.messages)


@dataclasses.dataclass(frozen=True)
class Labelled:
    """A text with its class label, for classification."""

    text: str
    label: str
    where: str = ""


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """A preference pair: the ``prompt`` conversation (``{"role", "content"}`` messages ending
    with a user message) and two assistant replies, ``chosen`` preferred to ``rejected``
    (each ``{"role": "assistant", "content"}``); ``margin`` the optional preference strength."""

    prompt: list[dict[str, str]]
    chosen: dict[str, str]
    rejected: dict[str, str]
    margin: float | None = None
    where: str = ""

    def text(self) -> str:
        return "\n\n".join(m["content"] for m in [*self.prompt, self.chosen, self.rejected])


@dataclasses.dataclass(frozen=True)
class Unpaired:
    """An unpaired judged example (KTO): ``messages`` ends with the assistant reply that is
    ``desirable`` (True) or not."""

    messages: list[dict[str, str]]
    desirable: bool
    where: str = ""

    def text(self) -> str:
        return "\n\n".join(m["content"] for m in self.messages)


Record = Conversation | Labelled | PreferencePair | Unpaired
Format = Callable[[mlc.ConfigDict], list[Record]]


def is_format(source: str) -> bool:
    """Whether ``data.source`` names a data format (records) rather than a plain document source."""
    return source in names("format")


def load_records(data_cfg: mlc.ConfigDict, key: str = "data.path") -> list[Record]:
    """The records of the format ``data.source`` names, from the files of ``data.path`` (or of
    the data key ``key``, e.g. ``data.val_path``), in file order. Raises DataError when
    ``data.source`` is not a format or the files hold no records."""
    if not is_format(data_cfg.source):
        raise DataError(f"data.source: {data_cfg.source!r} gives documents, not records: pass one of the data "
                        f"formats {', '.join(names('format'))} with --config.data.path=FILE")
    if key != "data.path":
        data_cfg = copy.deepcopy(data_cfg)
        data_cfg.path = data_cfg[key.removeprefix("data.")]
    records = lookup("format", data_cfg.source)(data_cfg)
    if not records:
        raise DataError(f"{key}: {data_cfg.path!r} holds no {data_cfg.source} records: point it at a "
                        f"non-empty file")
    return records


def split_records(records: list[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, val): a seeded choice of ``round(len * val_fraction)`` records (at least one when
    ``val_fraction > 0``) is validation; both keep file order. DataError if no training record is left."""
    n_val = max(int(round(len(records) * val_fraction)), 1 if val_fraction > 0 else 0)
    if n_val >= len(records):
        raise DataError(f"data.val_fraction: {val_fraction} of {len(records)} records leaves none for training: "
                        f"lower --config.data.val_fraction or use more data")
    held = set(np.random.default_rng(seed).permutation(len(records))[:n_val].tolist())
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def task_files(name: str, splits: dict[str, Callable[[], Iterable[dict[str, str]]]]) -> dict[str, pathlib.Path]:
    """``{split: PATH}``: a generated task's splits as ``prompt_completion`` JSONL (one
    ``{"prompt", "completion"}`` object a line, what ``data.source=prompt_completion`` reads with its
    default fields) in ``$LMSTACK_CACHE/tasks/NAME/SPLIT.jsonl`` (default ``~/.cache/lmstack``).
    ``splits`` maps each split to a function giving its rows, called only when the file is missing:
    files already there are kept, so ``name`` must say everything the rows depend on. Each file is
    written to a temporary name and renamed, so concurrent callers never read half a file."""
    folder = cache_dir() / "tasks" / name
    paths = {split: folder / f"{split}.jsonl" for split in splits}
    for split, rows in splits.items():
        if not paths[split].is_file():
            text = "".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}, ensure_ascii=False)
                           + "\n" for r in rows())
            write_atomic(paths[split], text.encode("utf-8"))
    return paths


def record_type(source: str) -> type:
    """The record class the format ``source`` yields (:class:`Conversation`, :class:`Labelled`,
    :class:`PreferencePair` or :class:`Unpaired`)."""
    return lookup("format", source, "data.source").record


def source_problems(data_cfg: mlc.ConfigDict, record: type, reader: str, what: str) -> list[str]:
    """[] when ``data.source`` names a data format whose records are ``record``s; else the
    one-line problem: ``reader`` (e.g. ``objective.classify``) reads ``what`` and which
    ``data.source`` values give them."""
    source = data_cfg.source
    if is_format(source) and record_type(source) is record:
        return []
    fits = ", ".join(n for n in names("format") if record_type(n) is record)
    return [f"data.source={source!r}: {reader} reads {what}: set --config.data.source to {fits} and "
            f"--config.data.path to the file"]


def _format(name: str, suffix: str, record: type = Conversation) -> Callable[[Callable], Format]:
    """Register a reader of one file as ``format.NAME`` (records of every file ``data.path``
    names, of class ``record``) and ``data.NAME`` (their texts as documents)."""

    def wrap(read_file: Callable[[pathlib.Path, mlc.ConfigDict], list[Record]]) -> Format:
        def records(data_cfg: mlc.ConfigDict) -> list[Record]:
            found = [r for path in resolve_paths(data_cfg.path, suffix=suffix) for r in read_file(path, data_cfg)]
            return fill_placeholders(found, data_cfg.get("placeholders", ""))

        def documents(data_cfg: mlc.ConfigDict) -> list[str]:
            return [r.text if isinstance(r, Labelled) else r.text() for r in records(data_cfg)]

        records.__doc__ = read_file.__doc__
        documents.__doc__ = f"The texts of the {name} records (a record's messages joined by blank lines)."
        register(f"data.{name}")(documents)
        return register(f"format.{name}", record=record)(records)

    return wrap


_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def fill_placeholders(records: list[Record], placeholders: str) -> list[Record]:
    """``records`` with ``{{key}}`` replaced by ``placeholders``' value for ``key`` in every
    text (messages, replies, classified texts); ``placeholders`` is ``data.placeholders``, a
    JSON object of strings, or "" (records returned as they are). Raises ConfigError when it
    is not such an object, DataError naming the record when a text holds a ``{{key}}`` it
    does not set."""
    if not placeholders:
        return records
    try:
        values = json.loads(placeholders)
    except json.JSONDecodeError as e:
        values = e
    if not (isinstance(values, dict) and all(isinstance(v, str) for v in values.values())):
        raise ConfigError(f"data.placeholders={placeholders!r} is not a JSON object of strings: write e.g. "
                          f'\'{{"name": "lmstack-bot", "author": "the lmstack team"}}\'')

    def fill(text: str, where: str) -> str:
        def value(m: re.Match) -> str:
            if m.group(1) not in values:
                raise DataError(f"data.placeholders: {where} holds {m.group(0)}, which data.placeholders does not "
                                f"set (it sets {', '.join(values) or 'nothing'}): add {m.group(1)!r} to it")
            return values[m.group(1)]

        return _PLACEHOLDER.sub(value, text)

    def fill_messages(messages: list[dict[str, str]], where: str) -> list[dict[str, str]]:
        return [{**m, "content": fill(m["content"], where)} for m in messages]

    out: list[Record] = []
    for r in records:
        w = r.where
        if isinstance(r, Labelled):
            out.append(dataclasses.replace(r, text=fill(r.text, w)))
        elif isinstance(r, PreferencePair):
            out.append(dataclasses.replace(r, prompt=fill_messages(r.prompt, w), chosen=fill_messages([r.chosen], w)[0],
                                           rejected=fill_messages([r.rejected], w)[0]))
        else:  # Conversation, Unpaired
            out.append(dataclasses.replace(r, messages=fill_messages(r.messages, w)))
    return out


def _json_records(path: pathlib.Path) -> Iterator[tuple[str, Any]]:
    """(where, object) of each record of a JSON list, or of each line of a ``.jsonl`` file."""
    text = read_utf8(path)
    if not text.strip():
        raise DataError(f"data.path: {path} is empty: point --config.data.path at a file with records")
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"data.path: {path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}): "
                                    f"fix or delete that line") from None
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"data.path: {path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}): "
                        f"fix the file (JSONL files need the .jsonl suffix)") from None
    if not isinstance(rows, list):
        raise DataError(f"data.path: {path}: expected a JSON list of records, got {type(rows).__name__}: "
                        f"write [{{...}}, {{...}}] or one record per line in a .jsonl file")
    for i, row in enumerate(rows, start=1):
        yield f"{path} record {i}", row


def _field(row: Any, key: str, where: str, fmt: str, required: bool = True,
           kind: type | tuple[type, ...] = str) -> Any:
    """``row[key]`` checked to be a ``kind``; absent: None if not ``required``."""
    if not isinstance(row, dict):
        raise DataError(f"{fmt}: {where}: expected a JSON object, got {type(row).__name__}: write one object "
                        f"per record")
    if key not in row or row[key] is None:
        if not required:
            return None
        raise DataError(f"{fmt}: {where}: no field {key!r} (fields: {', '.join(row) or 'none'}): "
                        f"add it or choose the matching data.source")
    if not isinstance(row[key], kind):
        wanted = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise DataError(f"{fmt}: {where}: field {key!r} is {type(row[key]).__name__}, not {wanted}: "
                        f"fix the record")
    return row[key]


@_format("alpaca", ".json")
def alpaca_file(path: pathlib.Path, data_cfg: mlc.ConfigDict) -> list[Record]:
    """Alpaca records ``{instruction, input?, output, system?, history?}`` as conversations."""
    out = []
    for where, row in _json_records(path):
        instruction = _field(row, "instruction", where, "alpaca")
        output = _field(row, "output", where, "alpaca")
        extra = _field(row, "input", where, "alpaca", required=False) or ""
        system = _field(row, "system", where, "alpaca", required=False)
        history = _field(row, "history", where, "alpaca", required=False, kind=list) or []
        messages = [{"role": "system", "content": system}] if system else []
        for turn, pair in enumerate(history, start=1):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                raise DataError(f"alpaca: {where}: history turn {turn} is not an [instruction, response] pair of "
                                f"strings: fix the record")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        user = "\n".join(s for s in (instruction, extra) if s)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        out.append(Conversation(messages, where))
    return out


@_format("sharegpt", ".json")
def sharegpt_file(path: pathlib.Path, data_cfg: mlc.ConfigDict) -> list[Record]:
    """ShareGPT ``conversations`` (``from``/``value``) or ``messages`` (``role``/``content``) records."""
    out = []
    for where, row in _json_records(path):
        key = "messages" if isinstance(row, dict) and "messages" in row else "conversations"
        messages = _messages(row, key, where, "sharegpt")
        if not messages:
            raise DataError(f"sharegpt: {where}: {key!r} is empty: drop the record or add its messages")
        out.append(Conversation(messages, where))
    return out


def _message(turn: Any, at: str, fmt: str, key: str, sharegpt: bool) -> dict[str, str]:
    """One turn as ``{"role", "content"}``: ShareGPT ``{from, value}`` or OpenAI ``{role, content}``."""
    names_, role_key, text_key = ((SHAREGPT_ROLES, "from", "value") if sharegpt
                                  else ({r: r for r in ROLES}, "role", "content"))
    who = _field(turn, role_key, at, fmt)
    if who not in names_:
        raise DataError(f"{fmt}: {at}: unknown role {who!r} in {key!r}: use {'/'.join(names_)}")
    return {"role": names_[who], "content": _field(turn, text_key, at, fmt)}


def _messages(row: Any, key: str, where: str, fmt: str) -> list[dict[str, str]]:
    """``row[key]``'s turns as messages, after ``row["system"]`` when the record has one."""
    turns = _field(row, key, where, fmt, kind=list)
    system = _field(row, "system", where, fmt, required=False)
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [_message(turn, f"{where} message {i}", fmt, key, key == "conversations")
                       for i, turn in enumerate(turns, start=1)]


@_format("prompt_completion", ".jsonl")
def prompt_completion_file(path: pathlib.Path, data_cfg: mlc.ConfigDict) -> list[Record]:
    """JSONL ``{prompt, completion}`` (``data.prompt_field``, ``data.completion_field``) as a user and an assistant turn."""
    out = []
    for where, row in _json_records(path):
        prompt = _field(row, data_cfg.prompt_field, where, "prompt_completion")
        completion = _field(row, data_cfg.completion_field, where, "prompt_completion")
        out.append(Conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                                where))
    return out


@_format("classification", ".tsv", Labelled)
def classification_file(path: pathlib.Path, data_cfg: mlc.ConfigDict) -> list[Record]:
    """Labelled texts from a TSV/CSV file with a header row, or JSONL (``data.field``, ``data.label_field``)."""
    text_key, label_key = data_cfg.field, data_cfg.label_field
    if path.suffix in (".jsonl", ".json"):
        out = []
        for where, row in _json_records(path):
            text = _field(row, text_key, where, "classification")
            label = _field(row, label_key, where, "classification", kind=(str, int, float, bool))
            out.append(Labelled(text, label if isinstance(label, str) else json.dumps(label), where))
        return out
    content = read_utf8(path)
    if not content.strip():
        raise DataError(f"data.path: {path} is empty: point --config.data.path at a file with records")
    if path.suffix == ".csv":
        reader = csv.reader(io.StringIO(content, newline=""))
    else:  # TSV as GLUE writes it: tabs, no quoting
        reader = csv.reader(io.StringIO(content, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader)
    columns = {}
    for key, name in (("data.field", text_key), ("data.label_field", label_key)):
        if name in header:
            columns[name] = header.index(name)
        elif name.isdigit() and int(name) < len(header):  # for files whose headers differ (SST-2's train and dev)
            columns[name] = int(name)
        else:
            raise DataError(f"classification: {path}:1: the header has no column {name!r} (columns: "
                            f"{', '.join(header)}): set --config.{key} to a column name or a 0-based column number")
    out = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        lineno = reader.line_num
        if len(row) != len(header):
            raise DataError(f"classification: {path}:{lineno}: {len(row)} columns, the header has {len(header)}: "
                            f"fix that line")
        out.append(Labelled(row[columns[text_key]], row[columns[label_key]].strip(), f"{path}:{lineno}"))
    return out


def _prompt(row: dict, where: str, fmt: str) -> list[dict[str, str]]:
    """The prompt messages of a preference or KTO record: ``conversations`` turns (ShareGPT)
    or ``prompt`` (a string: one user turn; or a list of messages)."""
    if "conversations" in row:
        return _messages(row, "conversations", where, fmt)
    prompt = _field(row, "prompt", where, fmt, kind=(str, list))
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(row, "prompt", where, fmt)


def _reply(row: dict, key: str, where: str, fmt: str) -> dict[str, str]:
    """``row[key]`` as one assistant message: a string, a turn object, or a list of one turn."""
    value = _field(row, key, where, fmt, kind=(str, dict, list))
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    turns = value if isinstance(value, list) else [value]
    if len(turns) != 1:
        raise DataError(f"{fmt}: {where}: {key!r} holds {len(turns)} messages: give one assistant reply "
                        f"(a string or a single message)")
    message = _message(turns[0], f"{where} {key}", fmt, key, isinstance(turns[0], dict) and "from" in turns[0])
    if message["role"] != "assistant":
        raise DataError(f"{fmt}: {where}: {key!r} is a {message['role']} message: the reply must be the "
                        f"assistant's (from gpt / role assistant)")
    return message


def _ends_with_user(prompt: list[dict[str, str]], where: str, fmt: str) -> None:
    if not prompt or prompt[-1]["role"] != "user":
        last = f"ends with a message of role {prompt[-1]['role']!r}" if prompt else "is empty"
        raise DataError(f"{fmt}: {where}: the prompt {last}: it must end with the user message the replies "
                        f"answer")


@_format("preference", ".json", PreferencePair)
def preference_file(path: pathlib.Path, data_cfg: mlc.ConfigDict) -> list[Record]:
    """Preference pairs: ShareGPT ``conversations`` + ``chosen``/``rejected`` turns, or
    ``prompt``/``chosen``/``rejected`` (strings or messages), with an optional ``margin``."""
    out = []
    for where, row in _json_records(path):
        if isinstance(row, dict):
            missing = [k for k in ("chosen", "rejected") if row.get(k) is None]
            if missing:
                raise DataError(f"preference: {where}: no {' and no '.join(repr(k) for k in missing)} reply "
                                f"(fields: {', '.join(row) or 'none'}): a pair needs both a chosen and a "
                                f"rejected reply: add it or drop the record")
        prompt = _prompt(row, where, "preference")
        _ends_with_user(prompt, where, "preference")
        chosen, rejected = (_reply(row, k, where, "preference") for k in ("chosen", "rejected"))
        if chosen["content"] == rejected["content"]:
            raise DataError(f"preference: {where}: 'chosen' and 'rejected' are the same reply, so the pair "
                            f"prefers nothing: drop the record or fix one of the replies")
        margin = _field(row, "margin", where, "preference", required=False, kind=(int, float))
        out.append(PreferencePair(prompt, chosen, rejected, None if margin is None else float(margin), where))
    return out


@_format("kto", ".json", Unpaired)
def kto_file(path: pathlib.Path, data_cfg: mlc.ConfigDict) -> list[Record]:
    """Unpaired judged examples: ``messages`` (or ShareGPT ``conversations``) ending with the
    assistant reply, or ``prompt``/``completion``; ``label`` true (desirable) or false."""
    out = []
    for where, row in _json_records(path):
        if isinstance(row, dict) and "completion" in row:
            prompt = _prompt(row, where, "kto")
            _ends_with_user(prompt, where, "kto")
            messages = prompt + [_reply(row, "completion", where, "kto")]
        else:
            messages = _messages(row, "messages" if isinstance(row, dict) and "messages" in row else "conversations",
                                 where, "kto")
            if not messages or messages[-1]["role"] != "assistant":
                raise DataError(f"kto: {where}: the conversation does not end with an assistant message: the last "
                                f"message is the reply the label judges")
            _ends_with_user(messages[:-1], where, "kto")
        label = _field(row, "label", where, "kto", kind=bool)
        out.append(Unpaired(messages, label, where))
    return out
