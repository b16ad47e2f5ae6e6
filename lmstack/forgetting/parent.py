"""The parent's data: the corpus the ``init.from`` weights were trained on, tokenized with the
run's tokenizer (the parent's own: ``init.from`` inherits it), split like the parent split it.

``init.data_source`` (a ``data.source`` name) and ``init.data_path`` name it, with the run's
other data settings; left empty, it is the ``data`` section the ``init.from`` run recorded
in its ``config.json`` (its source, path, field, max_chars and val_fraction). Replay and
EWC's Fisher read the parent's training split, ``eval.forgetting`` its held-out split.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections as mlc

from lmstack.config import ConfigError
from lmstack.data.pipeline import TokenStream, split_stream, tokenize_documents
from lmstack.data.sources import load_documents
from lmstack.data.tokenizers import Tokenizer


def needs_parent_data(cfg: Any, who: str) -> list[str]:
    """The load-time error (one line, in a list) when ``who`` needs the parent's data and the
    config names none: ``init.from`` is scratch and ``init.data_source`` empty."""
    if cfg.init.data_source or cfg.init["from"] not in ("", "scratch"):
        return []
    return [f"{who} needs the parent's data, but init.from is scratch and init.data_source is empty: set "
            f"--config.init.from=WORKDIR (a run; its own data is used) or --config.init.data_source=NAME "
            f"(with --config.init.data_path=PATH)"]


def parent_data_section(cfg: Any) -> mlc.ConfigDict:
    """The ``data`` settings of the parent's corpus (see the module docstring). ConfigError when
    ``init.data_source`` is empty and ``init.from`` is not a run with a ``config.json``."""
    from lmstack.init_from import parse_init_from

    if cfg.init.data_source:
        section = mlc.ConfigDict(cfg.data.to_dict())
        section.source, section.path = cfg.init.data_source, cfg.init.data_path
        return section
    source = parse_init_from(cfg.init["from"])
    path = source.path / "config.json" if source.path is not None else None
    if source.kind != "run" or not path.is_file():
        raise ConfigError(f"init.from={cfg.init['from']!r} is not a run with a config.json, so its data is unknown: "
                          f"name the parent's corpus with --config.init.data_source=NAME --config.init.data_path=PATH")
    try:
        saved = json.loads(path.read_text())["data"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ConfigError(f"{path}: no readable data section ({e}): restore it, or name the parent's corpus with "
                          f"--config.init.data_source=NAME --config.init.data_path=PATH") from None
    section = mlc.ConfigDict(cfg.data.to_dict())
    for key in ("source", "path", "field", "max_chars", "val_fraction"):
        if key in saved:
            section[key] = saved[key]
    return section


def parent_streams(cfg: Any, tokenizer: Tokenizer) -> tuple[TokenStream, TokenStream]:
    """(train, held-out) token streams of the parent's corpus, tokenized with ``tokenizer`` and
    split at the parent's ``val_fraction``; each split holds at least one window of the run's
    ``data.seq_len``. Loaded once per process for the same settings and tokenizer."""
    section = parent_data_section(cfg)
    key = (json.dumps(section.to_dict(), sort_keys=True), tokenizer.identity, cfg.data.seq_len)
    if key not in _LOADED:
        stream = tokenize_documents(load_documents(section), tokenizer)
        _LOADED.clear()  # one parent corpus per process is the common case: keep memory flat
        _LOADED[key] = split_stream(stream, section.val_fraction, seq_len=cfg.data.seq_len)
    return _LOADED[key]


_LOADED: dict[tuple, tuple[TokenStream, TokenStream]] = {}


def windows_only(cfg: Any, who: str) -> list[str]:
    """The load-time error (in a list) when ``who`` reads the parent's data as windows of its
    token stream but ``objective.name`` builds other batches (its own ``train_batches``)."""
    from lmstack import registry
    from lmstack.objectives.base import WindowObjective

    objective = registry.lookup("objective", cfg.objective.name, "objective.name")
    if getattr(objective, "train_batches", None) is WindowObjective.train_batches:
        return []
    return [f"{who} draws windows of the parent's token stream, which fit objectives trained on windows "
            f"(e.g. causal_lm), not objective.name={cfg.objective.name}, whose batches are built otherwise"]


def replay_problems(cfg: Any) -> list[str]:
    """The load-time errors of ``config.replay`` (its fraction, the rows it rounds to, the parent's
    data, the objective)."""
    f, batch = cfg.replay.fraction, cfg.train.batch_size
    if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 <= f < 1:
        return [f"replay.fraction is {f!r}: must be in [0, 1)"]
    if not f:
        return []
    k = round(f * batch)
    if not 0 < k < batch:
        return [f"replay.fraction={f} of train.batch_size={batch} rounds to {k} replay rows: pick a fraction "
                f"giving 1 to {batch - 1} rows (e.g. {1 / batch:.4g})"]
    who = f"replay.fraction={f}"
    return needs_parent_data(cfg, who) + windows_only(cfg, who)
