"""QLoRA (Dettmers et al. 2023): LoRA on a base whose projection weights are stored as NF4.

``peft.name=qlora`` attaches LoRA exactly as ``peft.lora`` (same keys) and stores the weight of
every projection of the blocks (PEFT/bitsandbytes quantise every linear layer but the output
head) as :class:`~lmstack.peft.nf4.NF4Tensor` in blocks of ``block_size`` with optional
double quantisation of the scales, dequantised to the compute dtype on the fly. The base
comes from ``init.from`` in float and is quantised once when the run starts
(:meth:`QLoRA.place_base`), as ``BitsAndBytesConfig(load_in_4bit=True)`` quantises on load.
Embeddings, norms and biases stay float32.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from lmstack.models.projection import QuantizedWeight
from lmstack.peft.lora import LORA_DEFAULTS, LoRA, LoraSpec, apply_lora, matches, projections
from lmstack.peft.nf4 import NF4Tensor, quantize_nf4
from lmstack.registry import register

QLORA_DEFAULTS: dict[str, Any] = dict(
    LORA_DEFAULTS,
    block_size=64,  # elements per absmax scale (bitsandbytes blocksize)
    double_quant=False,  # quantise the scales to 8 bits in blocks of 256 (bnb_4bit_use_double_quant)
)


def quantize_base(model: nnx.Module, block_size: int, double_quant: bool) -> list[str]:
    """Store the weight of every projection of the blocks as NF4; returns their paths."""
    done = []
    for path, proj in projections(model):
        if not matches(path, "all-linear") or not isinstance(proj.weight, nnx.Param):
            continue
        lead = len(proj.weight_shape) - proj.n_in - proj.n_out
        proj.weight = QuantizedWeight(quantize_nf4(proj.weight[...], block_size, double_quant, stack_dims=lead,
                                                   name=path))
        done.append(path)
    return done


@register("peft.qlora")
class QLoRA:
    """``peft.name=qlora``: see the module docstring; keys :data:`QLORA_DEFAULTS`."""

    config_defaults = QLORA_DEFAULTS
    adapter_types = (nnx.LoRAParam,)

    @staticmethod
    def config_problems(cfg: Any) -> list[str]:
        out = LoRA.config_problems(cfg)
        if cfg.peft.block_size < 1:
            out.append(f"peft.block_size={cfg.peft.block_size}: must be at least 1 (bitsandbytes uses 64)")
        return out

    @staticmethod
    def apply(model: nnx.Module, section: Any, key: jax.Array) -> None:
        apply_lora(model, LoraSpec.from_section(section), key)
        quantize_base(model, int(section.block_size), bool(section.double_quant))

    @staticmethod
    def place_base(loaded: nnx.State, whole: nnx.State) -> nnx.State:
        """``loaded`` (the float base from ``init.from``) with every weight that ``whole`` (the
        run's state) stores quantised turned into NF4 with the same block size and layout."""
        flat_whole = dict(nnx.to_flat_state(whole))
        out = []
        for path, var in nnx.to_flat_state(loaded):
            stored = flat_whole.get(path)
            if isinstance(stored, QuantizedWeight):
                like: NF4Tensor = stored.get_value()
                lead = like.data.ndim - 1
                var = QuantizedWeight(quantize_nf4(var.get_value(), like.block_size, like.double_quant,
                                                   stack_dims=lead, name=".".join(map(str, path))))
            out.append((path, var))
        return nnx.from_flat_state(out)
