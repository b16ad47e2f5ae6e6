"""Prefix language modelling on the decoder: the first ``P`` tokens of each window are a
prefix that attends to itself bidirectionally; the rest is causal, and only the tokens
after the prefix carry loss. ``P`` is drawn per row, uniform in
``[prefix_min, prefix_max] x seq_len``, from the step's RNG (so runs resume exactly);
evaluation uses ``P = seq_len / 2``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lmstack.objectives.base import WindowObjective
from lmstack.objectives.causal_lm import token_cross_entropy
from lmstack.registry import register


@register("objective.prefix_lm")
class PrefixLM(WindowObjective):
    config_defaults = dict(
        prefix_min=0.1,  # the training prefix length is uniform in [prefix_min, prefix_max] x seq_len
        prefix_max=0.9,
    )

    def prefix_lengths(self, batch_size: int, rng: jax.Array | None) -> jax.Array:
        n, o = self.cfg.data.seq_len, self.cfg.objective
        if rng is None:
            return jnp.full((batch_size,), n // 2, jnp.int32)
        lo, hi = max(1, int(o.prefix_min * n)), max(1, min(n - 1, int(o.prefix_max * n)))
        return jax.random.randint(rng, (batch_size,), lo, hi + 1, jnp.int32)

    def loss_fn(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array | None):
        tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
        r_prefix, r_model = (None, None) if rng is None else jax.random.split(rng)
        b, n = tokens.shape[0], tokens.shape[1] - 1
        p = self.prefix_lengths(b, r_prefix)[:, None]
        idx = jnp.arange(n)[None, :]
        # the prefix belongs to the row's first document (a window may start another after it)
        prefix = (idx < p) & (seg[:, :-1] == seg[:, :1])
        logits = model(tokens[:, :-1], positions=pos[:, :-1], segment_ids=seg[:, :-1], prefix_mask=prefix, rng=r_model)
        in_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        aux = token_cross_entropy(logits, tokens[:, 1:], in_doc & (idx + 1 >= p))
        return aux.pop("loss"), aux
