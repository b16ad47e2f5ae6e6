"""The PEFT method contract, and the trainable set.

A method is a class registered as ``peft.NAME`` with ``config_defaults`` (its keys of
``config.peft``), optional ``config_problems(cfg)``, ``adapter_types`` (the variable types it
adds; with ``train.trainable`` empty they are the trainable set) and
``apply(model, section, key)``, which adds its variables to a freshly built model (inside
the jitted initialisation, so they are created sharded). LoRA and (IA)^3 live in the
:class:`lmstack.models.projection.Projection` slots, so they reach every family; prompt
tuning, prefix tuning and bottleneck adapters fill slots of the decoder (``soft_prompt``,
``Attention.prefix_k``/``prefix_v``, ``Block.attn_adapter``/``mlp_adapter``) and say so
through :func:`family_problems`.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
from flax import nnx

from lmstack import registry
from lmstack.config import ConfigError


@registry.register("peft.none")
class NoPeft:
    """Full fine-tuning (or pre-training): no adapters; every parameter is trainable unless
    ``train.trainable`` / ``train.frozen`` say otherwise."""

    config_defaults: dict[str, Any] = {}
    adapter_types: tuple[type, ...] = ()

    @staticmethod
    def apply(model: nnx.Module, section: Any, key: jax.Array) -> None:
        del model, section, key


def disable_adapters(model: nnx.Module, adapter_types: tuple[type, ...]) -> nnx.Module:
    """``model`` with its adapters taken out, so its forward is the base model's (PEFT's
    ``disable_adapter()``, what TRL's DPO uses as the reference policy of a PEFT run): every
    slot a method filled (a variable of one of ``adapter_types``, or a module such as a
    bottleneck adapter whose variables are all of them) is set back to None. Changes
    ``model`` in place and returns it: call it on a model merged for the purpose (e.g.
    ``nnx.merge(graphdef, params, frozen)`` inside a jitted function)."""
    if not adapter_types:
        return model
    removed: list[tuple] = []
    for path, module in sorted(nnx.iter_modules(model), key=lambda pm: len(pm[0])):  # outermost first
        if any(path[:len(r)] == r for r in removed):
            continue  # inside an adapter module already taken out
        for name, value in list(vars(module).items()):
            if name.startswith("_"):
                continue
            if isinstance(value, adapter_types) or (isinstance(value, nnx.Module) and _only(value, adapter_types)):
                setattr(module, name, None)
                removed.append((*path, name))
    return model


def _only(module: nnx.Module, types: tuple[type, ...]) -> bool:
    leaves = [v for _, v in nnx.to_flat_state(nnx.state(module))]
    return bool(leaves) and all(isinstance(v, types) for v in leaves)


def family_problems(cfg: Any, method: str, families: tuple[str, ...]) -> list[str]:
    """A ``config_problems`` entry for a method that only some model families support."""
    if cfg.model.name in families:
        return []
    return [f"peft.name={method} supports model.name={' or '.join(families)}, not {cfg.model.name!r}: "
            f"choose another model family or a method for every family (peft.name=lora or ia3)"]


def _compile(pattern: str, key: str) -> re.Pattern | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{key}={pattern!r} is not a regular expression ({e}): fix the pattern") from None


def trainable_filter(train: Any, method: Any, objective_types: tuple[type, ...] = ()) -> Callable[[tuple, Any], bool]:
    """The nnx filter ``(path, variable) -> bool`` of the trainable set: ``nnx.Param``s whose
    dotted path fully matches ``train.trainable`` (empty: every parameter, or only the
    method's ``adapter_types`` when it has any), and every parameter of ``objective_types``
    (what an objective adds and always trains, its ``trainable_types``: PPO's value head,
    like PEFT's ``modules_to_save``), minus those matching ``train.frozen``.
    Raises ConfigError for a pattern that does not compile."""
    keep, drop = _compile(train.trainable, "train.trainable"), _compile(train.frozen, "train.frozen")
    adapters, added = tuple(method.adapter_types), tuple(objective_types)

    def is_trainable(path: tuple, var: Any) -> bool:
        if not isinstance(var, nnx.Param):
            return False
        name = ".".join(map(str, path))
        if isinstance(var, added):
            chosen = True
        elif keep is not None:
            chosen = keep.fullmatch(name) is not None
        else:
            chosen = isinstance(var, adapters) if adapters else True
        return chosen and (drop is None or drop.fullmatch(name) is None)

    return is_trainable


def parameter_paths(model_or_state: Any) -> list[str]:
    """Dotted paths of every ``nnx.Param`` (for error messages that list what exists)."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return [".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)]


def check_trainable(abstract: Any, train: Any) -> None:
    """Raises ConfigError when the trainable set is empty, listing the parameters there are."""
    if jax.tree.leaves(abstract["params"]):
        return
    have = parameter_paths(abstract["frozen"].filter(nnx.Param))
    shown = ", ".join(have[:12]) + (f", ... ({len(have)} in all)" if len(have) > 12 else "")
    raise ConfigError(f"the trainable set is empty (train.trainable={train.trainable!r}, "
                      f"train.frozen={train.frozen!r}): the parameters are {shown}; patterns match whole dotted paths")
