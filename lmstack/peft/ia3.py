"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
than In-Context Learning"), with the conventions of the PEFT library's ``IA3Config``.

Learned vectors rescale activations: on each targeted
:class:`~lmstack.models.projection.Projection` ``y = x W + b`` becomes ``y = (x W + b) * l``
(``ia3_out``, ``(*out,)``), or ``y = (x * l) W + b`` (``ia3_in``, ``(*in,)``) for the
projections also named in ``feedforward_modules``. Every vector starts at ones, so the
model is unchanged at step 0. PEFT's default for Llama, ``target_modules=[k_proj, v_proj,
down_proj]`` with ``feedforward_modules=[down_proj]``, is ours as ``k,v,down`` / ``down``:
the keys, the values and the input of the MLP's down projection. ``target_modules`` and
``feedforward_modules`` take names, regexes or ``all-linear`` as in :mod:`lmstack.peft.lora`.
Works for every family (the vectors live in the projection slots).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lmstack.config import ConfigError
from lmstack.models.projection import IA3Param, Projection
from lmstack.peft.lora import projections, targets
from lmstack.registry import register

IA3_DEFAULTS: dict[str, Any] = dict(
    target_modules="k,v,down",  # projections that get a scale (PEFT IA3Config.target_modules)
    feedforward_modules="down",  # of those, the ones scaled on their input ("": none)
)


def _scale(proj: Projection, shape: tuple[int, ...], axes: slice) -> IA3Param:
    lead = proj.weight.ndim - proj.n_in - proj.n_out
    names = tuple(proj.weight.get_metadata().get("out_sharding") or (None,) * proj.weight.ndim)
    stack = proj.weight.shape[:lead]
    return IA3Param(jnp.ones(stack + shape, jnp.float32), out_sharding=names[:lead] + names[axes])


def apply_ia3(model: nnx.Module, target_modules: str, feedforward_modules: str) -> list[str]:
    """Attach a ones-initialised scale to every projection ``target_modules`` selects:
    ``ia3_in`` ``(*in,)`` on those ``feedforward_modules`` also selects, ``ia3_out``
    ``(*out,)`` on the rest (with a leading ``layers`` axis inside stacked blocks). Returns
    the targeted paths. Raises ConfigError when either selects nothing, or when a
    feed-forward module is not a target (PEFT: feedforward_modules must be a subset of
    target_modules)."""
    chosen = targets(model, target_modules)
    try:
        feedforward = {p for p, _ in targets(model, feedforward_modules)} if feedforward_modules else set()
    except ConfigError as e:  # the same rule, reported under its own key
        raise ConfigError(str(e).replace("peft.target_modules", "peft.feedforward_modules", 1)) from None
    outside = sorted(feedforward - {p for p, _ in chosen})
    if outside:
        raise ConfigError(f"peft.feedforward_modules={feedforward_modules!r} selects {', '.join(outside)}, which "
                          f"peft.target_modules={target_modules!r} does not: feed-forward modules must be targets too")
    for path, proj in chosen:
        lead = proj.weight.ndim - proj.n_in - proj.n_out
        if path in feedforward:
            proj.ia3_in = _scale(proj, proj.in_shape, slice(lead, lead + proj.n_in))
        else:
            proj.ia3_out = _scale(proj, proj.out_shape, slice(lead + proj.n_in, None))
    return [p for p, _ in chosen]


def merge_ia3(model: nnx.Module) -> int:
    """Fold every scale into its projection (PEFT ``IA3Layer.merge``: the weight's output
    columns and the bias times ``ia3_out``, or its input rows times ``ia3_in``) and reset the
    scale to ones, so the model computes the same function with plain weights. Returns how
    many projections were folded."""
    n = 0
    for _, proj in projections(model):
        lead = proj.weight.ndim - proj.n_in - proj.n_out
        stack = proj.weight.shape[:lead]
        if proj.ia3_out is not None:
            s = proj.ia3_out[...]
            proj.weight[...] = proj.weight[...] * s.reshape(stack + (1,) * proj.n_in + proj.out_shape)
            if proj.bias is not None:
                proj.bias[...] = proj.bias[...] * s
            proj.ia3_out[...] = jnp.ones_like(s)
            n += 1
        if proj.ia3_in is not None:
            s = proj.ia3_in[...]
            proj.weight[...] = proj.weight[...] * s.reshape(stack + proj.in_shape + (1,) * proj.n_out)
            proj.ia3_in[...] = jnp.ones_like(s)
            n += 1
    return n


def ia3_parameter_count(model_cfg: Any) -> int:
    """The scales of the default targets: ``n_layers * (2 * n_kv_heads * head_dim + d_ff)``
    (the key and value outputs, the down projection's input)."""
    c = model_cfg
    return c.n_layers * (2 * c.n_kv_heads * c.head_dim + c.d_ff)


@register("peft.ia3")
class IA3:
    """``peft.name=ia3``: see the module docstring; keys :data:`IA3_DEFAULTS`."""

    config_defaults = IA3_DEFAULTS
    adapter_types = (IA3Param,)

    @staticmethod
    def apply(model: nnx.Module, section: Any, key: jax.Array) -> None:
        del key  # ones: nothing random
        apply_ia3(model, str(section.target_modules), str(section.feedforward_modules))
