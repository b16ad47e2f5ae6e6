"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning"), with the conventions of the PEFT library's ``PromptTuningConfig``.

``num_virtual_tokens`` learned embeddings (``soft_prompt``, ``(n, d_model)``) go before the
token embeddings of every row; the decoder runs them like tokens and drops their outputs,
so logits keep their shape (:func:`lmstack.models.decoder.prepend_soft_prompt` gives the
positions and the mask: in a packed row every document sees the virtual tokens as if it
ran alone after them). ``prompt_tuning_init``: ``sample_vocab`` copies the embeddings of
tokens drawn uniformly from the vocabulary (PEFT ``SAMPLE_VOCAB``; Lester et al. found
vocabulary-based initialisation better than random), ``text`` the embeddings of the tokens of
``prompt_tuning_init_text``, repeated to ``num_virtual_tokens`` and cut there (PEFT ``TEXT``,
e.g. a task description), ``random`` draws N(0, 1) (PEFT ``RANDOM``, ``torch.nn.Embedding``'s
default). ``sample_vocab`` and ``text`` copy rows of the embedding table the run starts from
(``init.from``'s, loaded after the model is built: :meth:`PromptTuning.start`). Decoder family only.
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
    prompt_tuning_init="sample_vocab",  # sample_vocab | text | random (PEFT PromptTuningInit, lower case)
    prompt_tuning_init_text="",  # prompt_tuning_init=text: the text whose token embeddings start the prompt
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


def text_prompt_ids(token_ids: list[int], num_virtual_tokens: int) -> list[int]:
    """The ids of ``prompt_tuning_init=text``: the text's tokens repeated until there are
    ``num_virtual_tokens`` and cut there (PEFT ``PromptEmbedding``'s ``TEXT`` initialisation)."""
    return (token_ids * -(-num_virtual_tokens // len(token_ids)))[:num_virtual_tokens]


def prompt_tuning_parameter_count(model_cfg: Any, num_virtual_tokens: int) -> int:
    """``num_virtual_tokens * d_model``."""
    return num_virtual_tokens * model_cfg.d_model


def _problems(cfg: Any) -> list[str]:
    p, out = cfg.peft, family_problems(cfg, "prompt_tuning", ("decoder",))
    if p.num_virtual_tokens < 1:
        out.append(f"peft.num_virtual_tokens={p.num_virtual_tokens}: must be at least 1")
    if (p.prompt_tuning_init == "text") != bool(p.prompt_tuning_init_text):
        out.append("peft.prompt_tuning_init=text and peft.prompt_tuning_init_text go together: set both (the text "
                   "whose token embeddings start the prompt) or neither")
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
    config_choices = {"prompt_tuning_init": ("sample_vocab", "text", "random")}
    adapter_types = (SoftPromptParam,)
    config_problems = staticmethod(_problems)

    @staticmethod
    def apply(model: nnx.Module, section: Any, key: jax.Array) -> None:
        init = str(section.prompt_tuning_init)
        apply_prompt_tuning(model, int(section.num_virtual_tokens), "sample_vocab" if init == "text" else init, key)

    @staticmethod
    def start(run: Any, state: dict) -> dict:
        """The soft prompt copied from the embedding table the run starts with (``init.from``'s,
        loaded into ``state`` after the model was built): the rows of ``sample_vocab``'s ids
        (drawn with ``train.seed``) or of the text's tokens; ``random`` keeps its draw."""
        p = run.cfg.peft
        n = int(p.num_virtual_tokens)
        whole = nnx.merge_state(state["params"], state["frozen"])
        table = whole["embed"].get_value()
        if p.prompt_tuning_init == "text":
            ids = jnp.asarray(text_prompt_ids(run.spec.tokenizer.encode(p.prompt_tuning_init_text), n))
        elif p.prompt_tuning_init == "sample_vocab":
            ids = jax.random.randint(jax.random.key(run.cfg.train.seed), (n,), 0, table.shape[0])
        else:
            return state
        flat = [(path, v.replace(jax.device_put(table[ids].astype(v.dtype), v.get_value().sharding))
                 if path == ("soft_prompt",) else v) for path, v in nnx.to_flat_state(state["params"])]
        return {**state, "params": nnx.from_flat_state(flat)}
