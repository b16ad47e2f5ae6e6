"""One small name -> object registry shared by every plug-in kind.

Names are namespaced by kind: ``model.decoder``, ``objective.causal_lm``,
``eval.perplexity``, ``data.stdlib``. Plug-in modules register themselves at import
time; :func:`lookup` imports the built-in plug-in packages first, so a name given in a
config resolves without the caller importing anything.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A config names a plug-in that is not registered."""

_ENTRIES: dict[str, Any] = {}
# packages whose __init__ imports their plug-ins, and plug-in modules imported one by one
_BUILTIN_PACKAGES = ("lmstack.models", "lmstack.objectives", "lmstack.evals", "lmstack.data", "lmstack.peft.base",
                     "lmstack.peft.lora", "lmstack.peft.qlora", "lmstack.peft.ia3", "lmstack.peft.prompt_tuning",
                     "lmstack.peft.prefix_tuning", "lmstack.peft.adapter", "lmstack.forgetting",
                     "lmstack.rl.rewards")


def register(name: str, **attributes: Any) -> Callable[[T], T]:
    """Decorator: ``@register("objective.causal_lm")`` records the decorated object.

    ``attributes`` are set on it, for plug-ins that are plain functions (evaluators):
    ``config_defaults`` (its config section's keys and defaults), ``config_choices``
    (allowed values of string keys) and ``config_problems(cfg) -> list[str]`` (settings it
    cannot work with, reported at load)."""
    if "." not in name:
        raise ValueError(f"registry name {name!r} must be namespaced, e.g. 'objective.{name}'")

    def wrap(obj: T) -> T:
        if name in _ENTRIES and _ENTRIES[name] is not obj:
            raise ValueError(f"registry name {name!r} is already taken by {_ENTRIES[name]!r}")
        for key, value in attributes.items():
            setattr(obj, key, value)
        _ENTRIES[name] = obj
        return obj

    return wrap


def _import_builtins() -> None:
    for pkg in _BUILTIN_PACKAGES:
        importlib.import_module(pkg)


def names(kind: str) -> list[str]:
    """All registered short names of one kind, sorted (``names('objective')``)."""
    _import_builtins()
    prefix = kind + "."
    return sorted(n[len(prefix):] for n in _ENTRIES if n.startswith(prefix))


def lookup(kind: str, name: str, key: str | None = None) -> Any:
    """The object registered as ``kind.name``; a clear error names the closest choices and,
    given ``key``, the config key that chose it."""
    _import_builtins()
    entry = f"{kind}.{name}"
    if entry in _ENTRIES:
        return _ENTRIES[entry]
    choices = names(kind)
    close = difflib.get_close_matches(name, choices, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    where = f"{key}: " if key else ""
    raise UnknownNameError(f"{where}unknown {kind} {name!r}: {hint}registered: {', '.join(choices) or 'none'}")
