"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation"), with the conventions of the PEFT library's ``PrefixTuningConfig``.

Every layer's self-attention gets ``num_virtual_tokens`` learned keys and values
(``blocks.attn.prefix_k`` / ``prefix_v``, ``(layers, n, n_kv_heads, head_dim)``) in front of
its own, seen by every query (:meth:`lmstack.models.layers.Attention.prepend_prefix`).
Initialised N(0, 1) as PEFT's ``PrefixEncoder`` embedding (``torch.nn.Embedding``'s default),
one key/value head per KV head as PEFT does for grouped-query models; PEFT's optional
``prefix_projection`` reparameterisation is not implemented.

Positions: PEFT hands the prefix to HF as ``past_key_values``, i.e. as cache entries that
already carry RoPE, and HF then numbers the real tokens from ``n``. Here the prefix is used
as given (no RoPE) and the tokens keep their own positions, which suits packed rows; for
RoPE the two are the same model with ``prefix_k`` here equal to PEFT's keys rotated by
``-n`` positions (``(R(n + p) q) . k = (R(p) q) . (R(-n) k)``). Decoder family only.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lmstack.peft.base import family_problems
from lmstack.registry import register

PREFIX_TUNING_DEFAULTS: dict[str, Any] = dict(num_virtual_tokens=20)


class PrefixParam(nnx.Param):
    """Prefix-tuning keys or values of every layer, ``(layers, num_virtual_tokens, n_kv_heads, head_dim)``."""


def apply_prefix_tuning(model: nnx.Module, num_virtual_tokens: int, key: jax.Array) -> None:
    """Give every attention layer of a decoder its N(0, 1) prefix keys and values."""
    c = model.cfg
    shape = (c.n_layers, num_virtual_tokens, c.n_kv_heads, c.head_dim)
    names = ("layers", None, "kv_heads", "head_dim")
    k_key, v_key = jax.random.split(key)
    model.blocks.attn.prefix_k = PrefixParam(jax.random.normal(k_key, shape, jnp.float32), out_sharding=names)
    model.blocks.attn.prefix_v = PrefixParam(jax.random.normal(v_key, shape, jnp.float32), out_sharding=names)


def prefix_tuning_parameter_count(model_cfg: Any, num_virtual_tokens: int) -> int:
    """``n_layers * 2 * num_virtual_tokens * n_kv_heads * head_dim``."""
    c = model_cfg
    return c.n_layers * 2 * num_virtual_tokens * c.n_kv_heads * c.head_dim


def _problems(cfg: Any) -> list[str]:
    out = family_problems(cfg, "prefix_tuning", ("decoder",))
    if cfg.peft.num_virtual_tokens < 1:
        out.append(f"peft.num_virtual_tokens={cfg.peft.num_virtual_tokens}: must be at least 1")
    return out


@register("peft.prefix_tuning")
class PrefixTuning:
    """``peft.name=prefix_tuning``: see the module docstring; keys :data:`PREFIX_TUNING_DEFAULTS`."""

    config_defaults = PREFIX_TUNING_DEFAULTS
    adapter_types = (PrefixParam,)
    config_problems = staticmethod(_problems)

    @staticmethod
    def apply(model: nnx.Module, section: Any, key: jax.Array) -> None:
        apply_prefix_tuning(model, int(section.num_virtual_tokens), key)
