"""Finding experiments, loading their configs, overriding, validating and saving them.

An experiment is a file ``experiments/NAME.py`` whose ``get_config(arg)`` returns a
ConfigDict built from :func:`lmstack.configs.base.base_config`. The loader composes the
plug-in sections (``model``, ``objective``, ``eval.NAME``) from the chosen plug-ins' own
keys (:func:`compose`), locks the result, applies ``--config.a.b=v`` overrides and checks
every name and value, all before anything is written: a typo is an error naming the
closest valid keys, a key the chosen plug-in lacks an error naming the plug-in and its keys.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import ml_collections as mlc

import lmstack
from lmstack import registry
from lmstack.configs.base import base_config

# Keys that do not change a run's results, so they may differ when resuming. name and arg
# are labels: the values they select are compared key by key.
RESUME_SAFE_KEYS = ("name", "arg", "train.progress", "train.log_every", "checkpoint.keep", "checkpoint.async_save")
RESUME_SAFE_PREFIXES = ("sample.", "log.", "eval.")
_CHOICES = {
    "optimizer.schedule": ("cosine", "linear", "constant"),
    "optimizer.name": ("adamw", "muon"),
}
# (section, registry kind): the config sections a plug-in owns; eval.NAME is handled apart.
PLUGIN_SECTIONS = (("model", "model"), ("objective", "objective"), ("peft", "peft"),
                   ("regularization", "regularization"))
# Overrides that choose plug-ins: applied before the sections are composed.
_CHOOSING_KEYS = ("model.name", "objective.name", "peft.name", "regularization.name", "eval.names")
_POSITIVE = ("train.steps", "train.batch_size", "train.microbatches", "data.seq_len",
             "model.d_model", "model.n_layers", "model.n_heads", "model.scan_unroll", "optimizer.muon_ns_steps")
_NON_NEGATIVE = ("model.vocab_size", "model.n_kv_heads", "model.head_dim", "model.d_ff",  # 0: derived
                 "model.max_seq_len", "optimizer.warmup_steps", "optimizer.decay_steps", "train.frozen_layers")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
_PREFIXES = ("--config.", "config.")


class ConfigError(ValueError):
    """A config problem, reported in one line: what, where, and what to do."""


def _show(path: Path) -> str:
    """A path as the user would type it: relative to the current directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def experiment_dirs() -> list[Path]:
    """Experiment directories, first wins: $LMSTACK_EXPERIMENTS, ./experiments, the repo's."""
    candidates = [Path(p) for p in os.environ.get("LMSTACK_EXPERIMENTS", "").split(os.pathsep) if p]
    candidates += [Path.cwd() / "experiments", Path(lmstack.__file__).resolve().parents[1] / "experiments"]
    dirs: list[Path] = []
    for d in candidates:
        d = d.resolve()
        if d.is_dir() and d not in dirs:
            dirs.append(d)
    return dirs


def _experiment_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for d in experiment_dirs():
        for f in sorted(d.glob("*.py")):
            if not f.name.startswith("_"):
                files.setdefault(f.stem, f)  # the first directory wins
    return files


def _description(path: Path) -> str:
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(), filename=str(path)))
    except SyntaxError as e:
        return f"(cannot parse: {e.msg}, line {e.lineno})"
    # The summary is the docstring's first paragraph, which may wrap over several lines.
    return " ".join(doc.split("\n\n")[0].split()) if doc else ""


def list_experiments() -> list[tuple[str, str]]:
    """(name, one-line description) of every experiment, sorted by name."""
    return sorted((name, _description(path)) for name, path in _experiment_files().items())


def import_experiment(name: str) -> ModuleType:
    """Import ``experiments/NAME.py`` as its own module ``lmstack_experiments.NAME``."""
    files = _experiment_files()
    if name not in files:
        close = difflib.get_close_matches(name, files, n=3)
        searched = ", ".join(_show(d) for d in experiment_dirs()) or "no experiments directory"
        hint = f"did you mean {', '.join(close)}?" if close else f"none in {searched}"
        raise ConfigError(f"unknown experiment {name!r}: {hint} (`lmstack list` shows all)")
    module_name = f"lmstack_experiments.{name}"
    spec = importlib.util.spec_from_file_location(module_name, files[name])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickle look the module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def parse_arg(arg: str | None, allowed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parse an experiment's variant string ``key=value,key2=value2`` into a dict.

    Without ``allowed``, values are Python literals where they parse (``smoke=True`` ->
    True, ``lr=3e-4`` -> 0.0003) and strings otherwise. With ``allowed`` (key -> default),
    each value is parsed as its default's type, defaults fill missing keys and unknown
    keys are an error. A bare ``key`` means ``key=True``.
    """
    out: dict[str, Any] = dict(allowed or {})
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, eq, raw = (s.strip() for s in item.partition("="))
        where = f"in variant {arg!r}"
        if not eq:
            if allowed is not None and key in allowed and not isinstance(allowed[key], bool):
                raise ConfigError(f"variant key {key!r} needs a value ({where}): write {key}=VALUE")
            raw = "True"
        if allowed is None:
            out[key] = _literal_or_str(raw, (bool, int, float))
        elif key not in allowed:
            raise ConfigError(f"unknown variant key {key!r} {where}: "
                              f"allowed keys are {', '.join(sorted(allowed))}")
        else:
            out[key] = _parse_as(raw, allowed[key], f"variant key {key!r}", where)
    return out


def flat_items(cfg: mlc.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> value for every leaf of ``cfg``."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, mlc.ConfigDict):
            out.update(flat_items(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _literal_or_str(raw: str, types: tuple[type, ...] = (object,)) -> Any:
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw
    return value if isinstance(value, types) else raw


def _parse_as(raw: str, current: Any, what: str, where: str) -> Any:
    """Parse ``raw`` as the type of ``current``; ``what`` and ``where`` go into the error."""
    kind = type(current)
    try:
        if current is None:
            return _literal_or_str(raw)
        if kind is bool and raw.strip().lower() in _TRUE + _FALSE:
            return raw.strip().lower() in _TRUE
        if kind is int:  # scientific notation is fine when integral: steps=1e5, not 1.5
            number = Decimal(raw.strip())
            if number.is_finite() and number == number.to_integral_value():
                return int(number)
            raise ValueError(raw)
        if kind is float:
            return float(raw)
        if kind is str:
            return raw
        value = ast.literal_eval(raw)  # other bool spellings fail here: 2 is not a bool
        if kind in (tuple, list) and isinstance(value, (tuple, list)):
            return kind(value)
        if isinstance(value, kind):
            return value
        raise ValueError(raw)
    except (ValueError, SyntaxError, TypeError, InvalidOperation):
        example = {bool: " (true/false)", tuple: " (e.g. (1, 2))", list: " (e.g. [1, 2])"}.get(kind, "")
        raise ConfigError(f"{what} expects {kind.__name__}{example}, got {raw!r} ({where})") from None


def _closest(key: str, keys: Sequence[str]) -> str:
    return ", ".join(difflib.get_close_matches(key, keys, n=3, cutoff=0.0))


def _split_overrides(overrides: Sequence[str]) -> list[tuple[str, str, str]]:
    """(key, raw value, text as written) from ``--config.a.b=v``, ``config.a.b=v``, ``--config.a.b v``."""
    out, i = [], 0
    while i < len(overrides):
        text = overrides[i]
        prefix = next((p for p in _PREFIXES if text.startswith(p)), None)
        if prefix is None:
            raise ConfigError(f"override {text!r} is not of the form --config.KEY=VALUE: "
                              f"e.g. --config.optimizer.lr=3e-4")
        key, eq, raw = text[len(prefix):].partition("=")
        if not eq:  # the two-token form: the next item is the value, whatever it looks like
            if i + 1 == len(overrides):
                raise ConfigError(f"override {text!r} has no value: write {text}=VALUE")
            i += 1
            raw, text = overrides[i], f"{text}={overrides[i]}"
        out.append((key, raw, text))
        i += 1
    return out


def apply_overrides(cfg: mlc.ConfigDict, overrides: Sequence[str]) -> dict[str, str]:
    """Set each ``--config.a.b=v`` in ``cfg``, parsing v as the existing value's type.

    Returns {dotted key: override as written}, so later errors can say where a value came from.
    """
    applied: dict[str, str] = {}
    leaves = list(flat_items(cfg))
    for key, raw, text in _split_overrides(overrides):
        where = f"from {text}"
        node, parts = cfg, key.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, mlc.ConfigDict) else None
        if not isinstance(node, mlc.ConfigDict) or parts[-1] not in node:
            owner = _plugin_owner(cfg, parts)
            if (parts[0] == "eval" and len(parts) == 3 and parts[1] in registry.names("eval")
                    and parts[1] not in cfg.eval.names):
                raise ConfigError(f"config key {key!r} ({where}) belongs to evaluator {parts[1]}, which is not in "
                                  f"eval.names {tuple(cfg.eval.names)}: add it, e.g. "
                                  f"--config.eval.names=\"{tuple(cfg.eval.names) + (parts[1],)}\"")
            if owner is not None:
                label, keys = owner
                raise ConfigError(f"unknown config key {key!r} ({where}): {label} has no key {parts[-1]!r}; "
                                  f"its keys: {', '.join(keys)}")
            raise ConfigError(f"unknown config key {key!r} ({where}): "
                              f"closest valid keys: {_closest(key, leaves)}")
        if isinstance(node[parts[-1]], mlc.ConfigDict):
            example = next(k for k in leaves if k.startswith(key + "."))
            raise ConfigError(f"config key {key!r} is a section, not a value ({where}): "
                              f"set its keys one at a time, e.g. --config.{example}=...")
        node[parts[-1]] = _parse_as(raw, node[parts[-1]], f"config key {key!r}", where)
        applied[key] = text
    return applied


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plugin_owner(cfg: mlc.ConfigDict, parts: Sequence[str]) -> tuple[str, list[str]] | None:
    """(``model.decoder``, its keys) when ``parts`` points into a plug-in's section."""
    for section, kind in PLUGIN_SECTIONS:
        if parts[0] == section and len(parts) == 2 and section in cfg:
            return f"{kind}.{cfg[section].name}", sorted(k for k in cfg[section] if k != "name")
    if (parts[0] == "eval" and len(parts) == 3 and parts[1] in cfg.eval
            and isinstance(cfg.eval[parts[1]], mlc.ConfigDict)):
        return f"eval.{parts[1]}", sorted(cfg.eval[parts[1]])
    return None


def _section_for(kind: str, name: str, key: str, given: Any, source: str) -> mlc.ConfigDict:
    """The plug-in ``kind.name``'s section: its defaults, overlaid with what ``given`` sets."""
    plugin = registry.lookup(kind, name, key)
    defaults = dict(getattr(plugin, "config_defaults", {}))
    label = key.rpartition(".")[0] if kind != "eval" else key
    section = mlc.ConfigDict({"name": name, **defaults} if kind != "eval" else defaults)
    for k, v in dict(given).items():
        if k == "name" and kind != "eval":
            continue
        if k not in defaults:
            keys = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(f"{source} sets {label}.{k}, which {kind}.{name} does not have: "
                              f"its keys are {keys}")
        try:
            section[k] = v
        except TypeError:
            raise ConfigError(f"{source} sets {label}.{k}={v!r}: {kind}.{name} expects "
                              f"{type(defaults[k]).__name__} (default {defaults[k]!r})") from None
    return section


def compose(cfg: mlc.ConfigDict, source: str = "the config") -> mlc.ConfigDict:
    """``cfg`` with its plug-in sections completed: ``model`` and ``objective`` get the chosen
    plug-in's keys with their defaults, ``eval.NAME`` each chosen evaluator's; what ``cfg``
    sets is kept. Raises ConfigError for a key the chosen plug-in (or the base config) lacks,
    naming the plug-in and its keys, and UnknownNameError for an unregistered name;
    ``source`` says where the values came from (the experiment file)."""
    out = base_config()
    for key, value in flat_items(cfg).items():
        parts = key.split(".")
        if parts[0] in dict(PLUGIN_SECTIONS) or (parts[0] == "eval" and len(parts) > 2):
            continue
        node = out
        for part in parts[:-1]:
            node = node[part] if isinstance(node, mlc.ConfigDict) and part in node else None
        if not isinstance(node, mlc.ConfigDict) or parts[-1] not in node:
            raise ConfigError(f"{source} sets {key!r}, which the base config lacks: closest valid keys: "
                              f"{_closest(key, list(flat_items(base_config())))}")
        node[parts[-1]] = value
    for section, kind in PLUGIN_SECTIONS:
        given = cfg.get(section, mlc.ConfigDict())
        out[section] = _section_for(kind, given.get("name", out[section].name), f"{section}.name", given, source)
    names = tuple(out.eval.names)
    for key in list(cfg.eval.keys()) if "eval" in cfg else []:
        if isinstance(cfg.eval[key], (mlc.ConfigDict, dict)) and key not in names:
            raise ConfigError(f"{source} sets eval.{key}, but {key!r} is not in eval.names {names}: "
                              f"add it to eval.names or drop its settings")
    for name in names:
        given = cfg.eval.get(name, {}) if "eval" in cfg else {}
        out.eval[name] = _section_for("eval", name, f"eval.{name}", given, source)
    out.name, out.arg = cfg.get("name", ""), cfg.get("arg", "")
    return out


def _plugin_problems(cfg: mlc.ConfigDict, resolve_model: bool) -> list[tuple[tuple[str, ...], str]]:
    """Choices and fit of the chosen plug-ins, and (``resolve_model``, once the rest is valid)
    the model config the family resolves."""
    from lmstack.objectives.base import microbatch_problems  # objectives import this module
    out: list[tuple[tuple[str, ...], str]] = []
    chosen = [(s, registry.lookup(k, cfg[s].name)) for s, k in PLUGIN_SECTIONS]
    chosen += [(f"eval.{n}", registry.lookup("eval", n)) for n in cfg.eval.names]
    for section, plugin in chosen:
        node = cfg.eval[section[5:]] if section.startswith("eval.") else cfg[section]
        for key, choices in getattr(plugin, "config_choices", {}).items():
            if node[key] not in choices:
                shown = ", ".join(repr(c) if c == "" else c for c in choices)
                out.append(((f"{section}.{key}",), f"{section}.{key} is {node[key]!r}: must be one of {shown}"))
        problems = getattr(plugin, "config_problems", None)
        for msg in problems(cfg) if problems else ():
            out.append(((), msg))
        if section == "objective":
            for msg in microbatch_problems(plugin, cfg.objective.name, cfg.train.microbatches):
                out.append((("train.microbatches",), msg))
    if resolve_model and not out:
        try:  # the family's own checks (options that rule each other out), before any side effect
            chosen[0][1].config_class.from_config(cfg.model, vocab_size=1, max_seq_len=cfg.data.seq_len)
        except ValueError as e:
            out.append(((), str(e)))
    return out


def _problems(cfg: mlc.ConfigDict) -> list[tuple[tuple[str, ...], str]]:
    """(keys involved, message) for every semantic problem in a composed ``cfg``."""
    flat = flat_items(cfg)
    out: list[tuple[tuple[str, ...], str]] = []
    for key, choices in {**_CHOICES, "data.tokenizer.kind": tuple(registry.names("tokenizer"))}.items():
        if flat.get(key) not in choices:
            out.append(((key,), f"{key} is {flat.get(key)!r}: must be one of {', '.join(choices)}"))
    n_choice_problems = len(out)
    for key in _POSITIVE:
        if key in flat and (not _is_int(flat[key]) or flat[key] <= 0):
            out.append(((key,), f"{key} is {flat.get(key)!r}: must be a positive int"))
    for key in _NON_NEGATIVE:
        if key in flat and (not _is_int(flat[key]) or flat[key] < 0):
            out.append(((key,), f"{key} is {flat.get(key)!r}: must be an int >= 0 (0 derives it)"))
    if len(out) > n_choice_problems:  # the arithmetic below needs the ints checked above
        return out + _plugin_problems(cfg, resolve_model=False)
    m = cfg.model
    bs, mb = cfg.train.batch_size, cfg.train.microbatches
    if bs % mb:
        up, fit = -(-bs // mb) * mb, max(d for d in range(1, mb + 1) if bs % d == 0)
        out.append((("train.batch_size", "train.microbatches"),
                    f"train.batch_size={bs} is not divisible by train.microbatches={mb}: "
                    f"set train.batch_size={up} or train.microbatches={fit}"))
    if "n_kv_heads" in m and m.n_kv_heads > 0 and m.n_heads % m.n_kv_heads:
        out.append((("model.n_heads", "model.n_kv_heads"),
                    f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}: "
                    f"pick n_kv_heads dividing n_heads (0 means n_heads)"))
    if "head_dim" in m and m.head_dim == 0 and m.d_model % m.n_heads:
        out.append((("model.d_model", "model.n_heads"),
                    f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}: "
                    f"change one, or set model.head_dim explicitly"))
    for key in ("data.val_fraction", "optimizer.b1", "optimizer.b2", "optimizer.muon_beta"):  # 1: no training data / NaN
        v = flat.get(key, 0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
            out.append(((key,), f"{key} is {v!r}: must be in [0, 1)"))
    for axis, size in cfg.mesh.items():
        if not _is_int(size) or (size < 1 and size != -1):
            out.append(((f"mesh.{axis}",),
                        f"mesh.{axis} is {size!r}: must be an int >= 1, or -1 for the remaining devices"))
    rest = [f"mesh.{a}" for a, s in cfg.mesh.items() if s == -1]
    if len(rest) > 1:
        out.append((tuple(rest),
                    f"{', '.join(rest)} are each -1: at most one mesh axis may take the remaining devices"))
    from lmstack.forgetting.parent import replay_problems  # it looks objectives up, which import this module
    out += [(("replay.fraction",), msg) for msg in replay_problems(cfg)]
    return out + _plugin_problems(cfg, resolve_model=not out)


def validate(cfg: mlc.ConfigDict) -> None:
    """Raise ConfigError naming every invalid value of a composed config (see :func:`compose`)."""
    problems = _problems(cfg)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(msg for _, msg in problems))


def load_config(spec: str, overrides: Sequence[str] = ()) -> mlc.ConfigDict:
    """Load ``NAME`` or ``NAME:arg``: compose the plug-in sections, lock, apply ``--config.a.b=v``
    overrides, and validate every name and value. Nothing is written."""
    name, colon, arg = spec.partition(":")
    module = import_experiment(name)
    source = _show(Path(module.__file__))
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"{source} defines no get_config(arg=None): "
                          f"add one returning base_config() with your changes")
    try:
        raw = get_config(arg if colon else None)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if not isinstance(raw, mlc.ConfigDict):
        raise ConfigError(f"{source}: get_config returned {type(raw).__name__}, not a ConfigDict: "
                          f"build it from base_config()")
    raw.name, raw.arg = name, arg
    return configure(raw, overrides, source, spec)


def configure(raw: mlc.ConfigDict, overrides: Sequence[str], source: str, label: str) -> mlc.ConfigDict:
    """``raw`` (an experiment's config, or a run's saved one) with the overrides that choose
    plug-ins applied, its sections composed, locked, the other overrides applied and every
    name and value validated; ``source`` and ``label`` name it in errors."""
    split = _split_overrides(overrides)
    choosing = [text for key, _, text in split if key in _CHOOSING_KEYS]
    with raw.unlocked():
        applied = apply_overrides(raw, choosing)
    cfg = compose(raw, source)
    cfg.lock()
    applied.update(apply_overrides(cfg, [text for key, _, text in split if key not in _CHOOSING_KEYS]))
    problems = _problems(cfg)
    if problems:
        defaults = flat_items(compose(base_config()))
        flat = flat_items(cfg)

        def origin(key: str) -> str:
            if key in applied:
                return f"from {applied[key]}"
            return f"set in {source}" if defaults.get(key, object()) != flat[key] else "the default"

        def where(keys: tuple[str, ...]) -> str:
            if not keys:
                return ""
            return f" ({origin(keys[0]) if len(keys) == 1 else ', '.join(f'{k} is {origin(k)}' for k in keys)})"

        raise ConfigError(f"invalid config {label!r}: " + "; ".join(f"{msg}{where(keys)}" for keys, msg in problems))
    return cfg


def save_config(cfg: mlc.ConfigDict, workdir: str | os.PathLike) -> Path:
    """Write ``workdir/config.json`` (sorted keys, indented) atomically: a crash leaves no half file."""
    path = Path(workdir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".config.json.{os.getpid()}.tmp")  # same directory, so the rename is atomic
    try:
        tmp.write_text(json.dumps(cfg.to_dict(), sort_keys=True, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_saved_config(workdir: str | os.PathLike) -> mlc.ConfigDict:
    """Read ``workdir/config.json`` back into a locked ConfigDict composed like the loader's
    (plug-in sections included), so values keep their types."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {str(workdir)!r}: "
                          f"is this a workdir written by `lmstack train`?")
    try:
        saved = mlc.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} line {e.lineno}: not valid JSON ({e.msg}): "
                          f"restore it or pick a new --workdir") from None
    cfg = compose(saved, str(path))  # ConfigDict casts to the defaults' types: list -> tuple, int -> float
    cfg.lock()
    return cfg


def _normalize(value: Any) -> Any:
    return tuple(map(_normalize, value)) if isinstance(value, (list, tuple)) else value


def check_resume(cfg: mlc.ConfigDict, workdir: str | os.PathLike) -> None:
    """Refuse to resume a run in ``workdir`` whose saved config differs in a key that changes results."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        return
    old, new = flat_items(load_saved_config(workdir)), flat_items(cfg)

    def show(flat: dict[str, Any], key: str) -> str:
        return repr(flat[key]) if key in flat else "<absent>"

    diffs = [f"{k}: {show(old, k)} -> {show(new, k)}" for k in sorted(old.keys() | new.keys())
             if k not in RESUME_SAFE_KEYS and not k.startswith(RESUME_SAFE_PREFIXES)
             and (k not in old or k not in new or _normalize(old[k]) != _normalize(new[k]))]
    if diffs:
        more = f"; ... and {len(diffs) - 5} more" if len(diffs) > 5 else ""
        raise ConfigError(f"workdir {str(workdir)!r} holds a run with a different config "
                          f"({'; '.join(diffs[:5])}{more}): resume with the same config "
                          f"(saved in {path}) or pick a new --workdir")
