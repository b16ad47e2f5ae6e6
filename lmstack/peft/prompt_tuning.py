"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning"), with the conventions of the PEFT library's ``PromptTuningConfig``.

``num_virtual_tokens`` learned embeddings (``soft_prompt``, ``(n, d_model)``) go before the
token embeddings of every row; the decoder runs them like tokens and drops their outputs,
so logits keep their shape (:func:`lmstack.models.decoder.prepend_soft_prompt` gives the
positions and the mask: in a packed row every document sees the virtual tokens as if it
ran alone after them). ``prompt_tuning_init``: ``sample_vocab`` copies the embeddings of
tokens drawn uniformly from the vocabulary (PEFT ``SAMPLE_VOCAB``; Lester et al. found
vocabulary-based initialisation better than random), ``random`` draws N(0, 1) (PEFT
``RANDOM``, ``torch.nn.Embedding``'s default). Decoder family only.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lmstack.peft.base import family_problems
from lmstack.registry import register

PROMPT_TUNING_DEFAULTS: dict[str, Any] = dict(
    num_virtual_tokens=20,
    prompt_tuning_init="sample_vocab",  # sample_vocab | random (PEFT PromptTuningInit, lower case)
)


class SoftPromptParam(nnx.Param):
    """The virtual token embeddings of prompt tuning, ``(num_virtual_tokens, d_model)``."""


def apply_prompt_tuning(model: nnx.Module, num_virtual_tokens: int, init: str, key: jax.Array) -> None:
    """Give a decoder its soft prompt, ``(num_virtual_tokens, d_model)`` float32, initialised
    as ``init`` says (see the module docstring)."""
    table = model.embed[...]
    shape = (num_virtual_tokens, table.shape[1])
    if init == "sample_vocab":
        prompt = table[jax.random.randint(key, (num_virtual_tokens,), 0, table.shape[0])]
    else:
        prompt = jax.random.normal(key, shape, jnp.float32)
    model.soft_prompt = SoftPromptParam(prompt.astype(jnp.float32), out_sharding=(None, "embed"))


def prompt_tuning_parameter_count(model_cfg: Any, num_virtual_tokens: int) -> int:
    """``num_virtual_tokens * d_model``."""
    return num_virtual_tokens * model_cfg.d_model


def _problems(cfg: Any) -> list[str]:
    p, out = cfg.peft, family_problems(cfg, "prompt_tuning", ("decoder",))
    if p.num_virtual_tokens < 1:
        out.append(f"peft.num_virtual_tokens={p.num_virtual_tokens}: must be at least 1")
    m = cfg.model
    if not out and m.style == "gpt2" and (m.max_seq_len or cfg.data.seq_len) < cfg.data.seq_len + p.num_virtual_tokens:
        out.append(f"peft.num_virtual_tokens={p.num_virtual_tokens} with data.seq_len={cfg.data.seq_len} needs "
                   f"{cfg.data.seq_len + p.num_virtual_tokens} learned positions, but model.max_seq_len is "
                   f"{m.max_seq_len or cfg.data.seq_len}: raise model.max_seq_len or use fewer virtual tokens")
    return out


@register("peft.prompt_tuning")
class PromptTuning:
    """``peft.name=prompt_tuning``: see the module docstring; keys :data:`PROMPT_TUNING_DEFAULTS`."""

    config_defaults = PROMPT_TUNING_DEFAULTS
    config_choices = {"prompt_tuning_init": ("sample_vocab", "random")}
    adapter_types = (SoftPromptParam,)
    config_problems = staticmethod(_problems)

    @staticmethod
    def apply(model: nnx.Module, section: Any, key: jax.Array) -> None:
        apply_prompt_tuning(model, int(section.num_virtual_tokens), str(section.prompt_tuning_init), key)
