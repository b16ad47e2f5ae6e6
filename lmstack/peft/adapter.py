"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP";
Pfeiffer et al. 2021, "AdapterFusion").

An adapter maps a sublayer's output ``h`` (after its dropout, before the residual add, as
in Houlsby et al.'s figure 2 and AdapterHub's BERT wiring) to ``h + up(act(down(h)))``:
``down`` ``d_model -> bottleneck`` and ``up`` ``bottleneck -> d_model``, both with biases.
``down`` starts N(0, 0.01^2) (Houlsby et al.'s near-identity initialisation) and ``up`` at
zero, so the model is exactly unchanged at step 0. ``placement``: ``houlsby`` puts one
after the attention and one after the MLP of every block, ``pfeiffer`` one after the MLP
only. ``activation``: any non-gated entry of :data:`lmstack.models.layers.ACTIVATIONS`.
Decoder family only; the adapters are stacked with the blocks' ``layers`` axis
(``blocks.attn_adapter.down.weight`` ``(layers, d_model, bottleneck)``).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from lmstack.models.layers import ACTIVATIONS
from lmstack.models.projection import Projection
from lmstack.peft.base import family_problems
from lmstack.registry import register

ADAPTER_DEFAULTS: dict[str, Any] = dict(
    bottleneck=64,  # the adapter's inner width
    placement="houlsby",  # houlsby: after attention and after the MLP | pfeiffer: after the MLP only
    activation="relu",  # relu | gelu | gelu_tanh
)
PLACEMENTS = {"houlsby": ("attn_adapter", "mlp_adapter"), "pfeiffer": ("mlp_adapter",)}
DOWN_STD = 0.01  # Houlsby et al. 2019, section 2.1: near-identity initialisation


class AdapterParam(nnx.Param):
    """A bottleneck adapter's weight or bias."""


class BottleneckAdapter(nnx.Module):
    """``h + up(act(down(h)))`` over the last axis of ``h`` (see the module docstring)."""

    def __init__(self, d_model: int, bottleneck: int, activation: str, *, dtype: str, rngs: nnx.Rngs):
        self.down = Projection((d_model,), (bottleneck,), ("embed", None), std=DOWN_STD, bias=True, rngs=rngs,
                               dtype=dtype)
        self.up = Projection((bottleneck,), (d_model,), (None, "embed"), std=0.0, bias=True, bias_names=("norm",),
                             rngs=rngs, dtype=dtype)
        for proj in (self.down, self.up):  # their own variable type: the trainable set picks them by it
            proj.weight = AdapterParam(proj.weight.get_value(), **proj.weight.get_metadata())
            proj.bias = AdapterParam(proj.bias.get_value(), **proj.bias.get_metadata())
        self.act = ACTIVATIONS[activation][0]

    def __call__(self, h_btd: jax.Array) -> jax.Array:
        return h_btd + self.up(self.act(self.down(h_btd))).astype(h_btd.dtype)


def apply_adapters(model: nnx.Module, bottleneck: int, placement: str, activation: str, key: jax.Array) -> list[str]:
    """Attach stacked adapters (one per layer) at ``placement``'s slots of a decoder's blocks;
    returns their paths."""
    c = model.cfg
    slots = PLACEMENTS[placement]
    for i, slot in enumerate(slots):
        @nnx.split_rngs(splits=c.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs: nnx.Rngs) -> BottleneckAdapter:
            return BottleneckAdapter(c.d_model, bottleneck, activation, dtype=c.dtype, rngs=rngs)

        setattr(model.blocks, slot, make(nnx.Rngs(params=jax.random.fold_in(key, i))))
    return [f"blocks.{s}" for s in slots]


def adapter_parameter_count(model_cfg: Any, bottleneck: int, placement: str) -> int:
    """``n_layers * placements * (2 * d_model * bottleneck + bottleneck + d_model)`` (weights
    and biases; 2 placements for houlsby, 1 for pfeiffer)."""
    c = model_cfg
    return c.n_layers * len(PLACEMENTS[placement]) * (2 * c.d_model * bottleneck + bottleneck + c.d_model)


def _problems(cfg: Any) -> list[str]:
    out = family_problems(cfg, "adapter", ("decoder",))
    if cfg.peft.bottleneck < 1:
        out.append(f"peft.bottleneck={cfg.peft.bottleneck}: must be at least 1")
    return out


@register("peft.adapter")
class Adapter:
    """``peft.name=adapter``: see the module docstring; keys :data:`ADAPTER_DEFAULTS`."""

    config_defaults = ADAPTER_DEFAULTS
    config_choices = {"placement": tuple(PLACEMENTS),
                      "activation": tuple(name for name, (_, gated) in ACTIVATIONS.items() if not gated)}
    adapter_types = (AdapterParam,)
    config_problems = staticmethod(_problems)

    @staticmethod
    def apply(model: nnx.Module, section: Any, key: jax.Array) -> None:
        apply_adapters(model, int(section.bottleneck), str(section.placement), str(section.activation), key)
