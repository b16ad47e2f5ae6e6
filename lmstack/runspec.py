"""The run spec: what a run derives once and keeps, apart from the config the user wrote.

A run decides its tokenizer, the ids it reserves beyond the tokenizer's vocabulary (T5
sentinels, ``[MASK]``, UL2 mode tokens, chat markers: by name) and its resolved model
config (the family's keys with ``vocab_size`` and ``max_seq_len`` filled in) once, saves
them as ``WORKDIR/run_spec.json`` and ``WORKDIR/tokenizer/``, and never writes them back
into the config. A run started from another (``init.from``) inherits its parent's spec:
pretrain -> sft -> dpo keeps one vocabulary and one architecture.

Reserved ids: in a fresh run, the objective's special tokens take the top ids of the
vocabulary in the order the objective lists them (``<extra_id_0>`` is ``vocab_size - 1``,
as in T5). A child run whose objective needs names its parent lacks appends them after the
parent's vocabulary (the embedding and output tables grow; see
:func:`lmstack.init_from.resize_vocab`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import ml_collections as mlc
import numpy as np

from lmstack.config import ConfigError
from lmstack.data.tokenizers import Tokenizer, load_tokenizer, save_tokenizer

SPEC_FILE = "run_spec.json"
_FORMAT_VERSION = 1


@dataclasses.dataclass
class RunSpec:
    """``tokenizer``; ``special_ids`` (name -> id); ``model``: the resolved ``config.model``
    section (plain dict, ``name`` included); ``data_digest``: sha256 of the token streams the
    run trained on ("" before any data); ``lineage``: where its weights started
    (``{"from": "scratch"}``, or the parent's path, kind and step)."""

    tokenizer: Tokenizer
    special_ids: dict[str, int]
    model: dict[str, Any]
    data_digest: str = ""
    lineage: dict[str, Any] = dataclasses.field(default_factory=lambda: {"from": "scratch"})

    @property
    def vocab_size(self) -> int:
        return int(self.model["vocab_size"])

    def model_section(self) -> mlc.ConfigDict:
        """The resolved model config as a frozen ConfigDict, for the family's ``from_config``."""
        return mlc.FrozenConfigDict(self.model)

    def save(self, workdir: str | os.PathLike) -> Path:
        """Write ``run_spec.json`` and ``tokenizer/`` into ``workdir`` (atomically, file by file)."""
        workdir = Path(workdir)
        save_tokenizer(self.tokenizer, workdir / "tokenizer")
        body = {"format": _FORMAT_VERSION, "special_ids": self.special_ids, "model": self.model,
                "data_digest": self.data_digest, "lineage": self.lineage}
        path = workdir / SPEC_FILE
        tmp = path.with_name(f".{SPEC_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, workdir: str | os.PathLike) -> "RunSpec":
        """The spec :meth:`save` wrote into ``workdir``; ConfigError if there is none."""
        path = Path(workdir) / SPEC_FILE
        if not path.is_file():
            raise ConfigError(f"no {SPEC_FILE} in {str(workdir)!r}: not a workdir written by `lmstack train` "
                              f"or `lmstack import`; pass one of those")
        body = json.loads(path.read_text())
        return cls(tokenizer=load_tokenizer(Path(workdir) / "tokenizer"), special_ids=dict(body["special_ids"]),
                   model=dict(body["model"]), data_digest=body.get("data_digest", ""),
                   lineage=dict(body.get("lineage", {"from": "scratch"})))

    @classmethod
    def exists(cls, workdir: str | os.PathLike) -> bool:
        return (Path(workdir) / SPEC_FILE).is_file()


def fresh_spec(cfg: Any, tokenizer: Tokenizer, special_tokens: Sequence[str]) -> RunSpec:
    """The spec of a run from scratch: ``special_tokens`` take the top ids of the vocabulary
    (``model.vocab_size``, or 0 for the tokenizer's size plus the reserved ids)."""
    needed = tokenizer.vocab_size + len(special_tokens)
    v = cfg.model.vocab_size
    if v and v < needed:
        reserved = f" + {len(special_tokens)} reserved by objective.{cfg.objective.name}" if special_tokens else ""
        raise ConfigError(
            f"model.vocab_size={v} is smaller than the tokenizer's {tokenizer.vocab_size} tokens{reserved} "
            f"(the {tokenizer.kind} tokenizer data.tokenizer describes): "
            f"set --config.model.vocab_size=0 to take the tokenizer's size, or use a matching tokenizer")
    vocab = v or needed
    model = dict(cfg.model.to_dict(), vocab_size=vocab)
    model["max_seq_len"] = model.get("max_seq_len") or cfg.data.seq_len
    return RunSpec(tokenizer=tokenizer, special_ids={name: vocab - 1 - i for i, name in enumerate(special_tokens)},
                   model=model)


def with_special_tokens(spec: RunSpec, names: Sequence[str]) -> RunSpec:
    """``spec`` with every name in ``names`` it lacks appended after its vocabulary."""
    special = dict(spec.special_ids)
    vocab = spec.vocab_size
    for name in names:
        if name not in special:
            special[name] = vocab
            vocab += 1
    return dataclasses.replace(spec, special_ids=special, model=dict(spec.model, vocab_size=vocab))


def stream_digest(*token_arrays: np.ndarray) -> str:
    """sha256 over token arrays (lengths included), naming the data a run trained on."""
    h = hashlib.sha256()
    for a in token_arrays:
        a = np.ascontiguousarray(a, np.int32)
        h.update(len(a).to_bytes(8, "little"))
        h.update(a.tobytes())
    return h.hexdigest()
