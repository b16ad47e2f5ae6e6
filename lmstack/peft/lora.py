"""LoRA (Hu et al. 2021), with the conventions of the PEFT library so adapters move between
the two (see :mod:`lmstack.interop.peft_export`).

On each targeted :class:`~lmstack.models.projection.Projection` ``y = x W`` becomes
``y = x W + scaling * dropout(x) A B`` with ``A`` ``(*in, r)`` drawn uniform in
``+-1/sqrt(fan_in)`` (PEFT's ``kaiming_uniform_(a=sqrt(5))`` on ``lora_A``) and ``B``
``(r, *out)`` zero, so the model is unchanged at step 0. ``scaling`` is ``alpha / r``, or
``alpha / sqrt(r)`` with ``use_rslora`` (Kalajdzievski 2023, PEFT ``use_rslora``).

``target_modules`` follows PEFT: a comma-separated list of names matches a projection whose
dotted path equals a name or ends in ``.name`` (``q,v`` -> ``blocks.attn.q``,
``blocks.attn.v``); anything else is a regular expression that must match the whole path;
``all-linear`` targets every projection of the blocks (PEFT's choice: not the output head).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from lmstack.config import ConfigError
from lmstack.models.projection import Projection
from lmstack.registry import register

LORA_DEFAULTS: dict[str, Any] = dict(
    r=8,  # rank
    alpha=16.0,  # scaling = alpha / r (alpha / sqrt(r) with use_rslora)
    dropout=0.0,  # on the adapter's input, while training (PEFT lora_dropout)
    target_modules="q,v",  # names (suffix match), a full-path regex, or all-linear (PEFT semantics)
    use_rslora=False,
)
_NAME_LIST = re.compile(r"[\w.]+(,[\w.]+)*")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    dropout: float
    target_modules: str
    use_rslora: bool

    @classmethod
    def from_section(cls, section: Any) -> "LoraSpec":
        return cls(int(section.r), float(section.alpha), float(section.dropout), str(section.target_modules),
                   bool(section.use_rslora))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def projections(model: nnx.Module) -> Iterator[tuple[str, Projection]]:
    """Every projection of ``model`` with its dotted path (``blocks.attn.q``), in graph order."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Projection):
            yield ".".join(map(str, path)), node


def matches(path: str, target_modules: str) -> bool:
    """PEFT's ``target_modules`` rule for one dotted module path (see the module docstring)."""
    if target_modules == "all-linear":
        return ".blocks." in f".{path}" or path.startswith("blocks")
    if _NAME_LIST.fullmatch(target_modules):
        return any(path == n or path.endswith("." + n) for n in target_modules.split(","))
    return re.fullmatch(target_modules, path) is not None


def targets(model: nnx.Module, target_modules: str) -> list[tuple[str, Projection]]:
    """The projections ``target_modules`` selects. Raises ConfigError naming the projections
    that exist when it selects none."""
    try:
        found = [(p, m) for p, m in projections(model) if matches(p, target_modules)]
    except re.error as e:
        raise ConfigError(f"peft.target_modules={target_modules!r} is not a regular expression ({e})") from None
    if not found:
        have = ", ".join(p for p, _ in projections(model))
        raise ConfigError(f"peft.target_modules={target_modules!r} matches no projection of {type(model).__name__}: "
                          f"its projections are {have}: give names from this list (comma-separated) or a regex "
                          f"matching whole paths")
    return found


def _stack_dims(proj: Projection) -> int:
    return len(proj.weight_shape) - proj.n_in - proj.n_out


def apply_lora(model: nnx.Module, spec: LoraSpec, key: jax.Array) -> list[str]:
    """Attach a LoRA pair to every targeted projection of ``model``; returns their paths.
    Raises ConfigError when the rank exceeds a targeted layer's ``min(fan_in, fan_out)``."""
    chosen = targets(model, spec.target_modules)
    for i, (path, proj) in enumerate(chosen):
        fan_in, fan_out = math.prod(proj.in_shape), math.prod(proj.out_shape)
        if spec.r > min(fan_in, fan_out):
            raise ConfigError(f"peft.r={spec.r} is larger than projection {path} (in {fan_in}, out {fan_out}): "
                              f"a rank above min(in, out) = {min(fan_in, fan_out)} adds nothing; lower --config.peft.r")
        lead = _stack_dims(proj)
        names = tuple(proj.weight.get_metadata().get("out_sharding") or (None,) * proj.weight.ndim)
        stack = proj.weight_shape[:lead]
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), stack + proj.in_shape + (spec.r,), jnp.float32,
                               -bound, bound)
        b = jnp.zeros(stack + (spec.r,) + proj.out_shape, jnp.float32)
        proj.lora_a = nnx.LoRAParam(a, out_sharding=names[: lead + proj.n_in] + ("lora_rank",))
        proj.lora_b = nnx.LoRAParam(b, out_sharding=names[:lead] + ("lora_rank",) + names[lead + proj.n_in:])
        proj.lora_scaling = spec.scaling
        proj.lora_dropout = spec.dropout
    return [p for p, _ in chosen]


def delta_weight(proj: Projection) -> jax.Array:
    """``scaling * A B`` in the weight's shape (float32): what merging adds to ``weight``."""
    lead = _stack_dims(proj)
    stack = proj.weight_shape[:lead]
    k, n, r = math.prod(proj.in_shape), math.prod(proj.out_shape), proj.lora_a.shape[-1]
    a = proj.lora_a[...].reshape(*stack, k, r)
    b = proj.lora_b[...].reshape(*stack, r, n)
    return (proj.lora_scaling * jnp.matmul(a, b)).reshape(proj.weight_shape)


def merge_lora(model: nnx.Module) -> int:
    """Add every unmerged adapter into its base weight (PEFT ``merge_adapter``); the adapter
    stays, so :func:`unmerge_lora` can take it out again. Returns how many were merged.
    Raises ConfigError for a base stored as NF4 (QLoRA): merge into a float copy instead."""
    n = 0
    for path, proj in projections(model):
        if proj.lora_a is not None and not isinstance(proj.weight, nnx.Param):
            raise ConfigError(f"{path}: the base weight is stored quantised (QLoRA); merging would need it in "
                              f"float: load the base without peft.name=qlora and the adapter on top, then merge")
        if proj.lora_a is not None and not proj.lora_merged:
            proj.weight[...] = proj.weight[...] + delta_weight(proj)
            proj.lora_merged = True
            n += 1
    return n


def unmerge_lora(model: nnx.Module) -> int:
    """Subtract every merged adapter from its base weight (PEFT ``unmerge_adapter``)."""
    n = 0
    for _, proj in projections(model):
        if proj.lora_a is not None and proj.lora_merged:
            proj.weight[...] = proj.weight[...] - delta_weight(proj)
            proj.lora_merged = False
            n += 1
    return n


def lora_parameter_count(model: nnx.Module) -> int:
    """Adapter parameters: ``r * (fan_in + fan_out)`` per targeted projection and layer."""
    return sum(p.lora_a.size + p.lora_b.size for _, p in projections(model) if p.lora_a is not None)


@register("peft.lora")
class LoRA:
    """``peft.name=lora``: see the module docstring; keys :data:`LORA_DEFAULTS`."""

    config_defaults = LORA_DEFAULTS
    adapter_types = (nnx.LoRAParam,)

    @staticmethod
    def config_problems(cfg: Any) -> list[str]:
        p, out = cfg.peft, []
        if p.r < 1:
            out.append(f"peft.r={p.r}: the rank must be at least 1")
        if p.alpha <= 0:
            out.append(f"peft.alpha={p.alpha}: must be positive (scaling = alpha / r)")
        if not 0.0 <= p.dropout < 1.0:
            out.append(f"peft.dropout={p.dropout}: must be in [0, 1)")
        return out

    @staticmethod
    def apply(model: nnx.Module, section: Any, key: jax.Array) -> None:
        apply_lora(model, LoraSpec.from_section(section), key)
