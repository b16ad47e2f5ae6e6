"""Causal language modelling: predict each token from the ones before it in its document."""

from __future__ import annotations

from typing import Any

import jax

from lmstack.objectives.base import WindowObjective
from lmstack.token_logps import chunked_cross_entropy, cross_entropy_sums, token_logps
from lmstack.registry import register


def token_cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array) -> dict[str, jax.Array]:
    """Summed cross-entropy and accuracy over the positions where ``mask`` is true."""
    return cross_entropy_sums(token_logps(logits_btv, targets_bt), mask_bt)


@register("objective.causal_lm")
class CausalLM(WindowObjective):
    """Batches hold ``tokens``, ``segment_ids`` and ``positions`` of length ``seq_len + 1``;
    the model reads the first ``seq_len`` and predicts the last ``seq_len``. A target in
    another document than its input (or in padding, segment 0) carries no loss, nor does one
    whose ``loss_mask`` is 0 where the batch has that field (SFT's prompt tokens).

    ``objective.loss_chunk`` > 0 computes the output head and the loss that many sequence
    positions at a time (:func:`lmstack.token_logps.chunked_cross_entropy`), so a
    step holds ``batch x loss_chunk x vocab`` float32 logits instead of ``batch x seq_len x
    vocab``; the loss and gradients are unchanged. It is an objective key, not a model one,
    because the model's output (logits) is unchanged: only how this loss reduces them is."""

    config_defaults = dict(
        loss_chunk=0,  # sequence positions per chunk of the head + cross-entropy; 0: all at once
    )

    @classmethod
    def config_problems(cls, cfg: Any) -> list[str]:
        """Settings this objective cannot train with, found at load time."""
        chunk = cfg.objective.loss_chunk
        if chunk < 0:
            return [f"objective.loss_chunk={chunk}: must be >= 0 sequence positions (0: the whole sequence at "
                    f"once)"]
        return []

    def loss_fn(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array | None):
        tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
        inputs = dict(positions=pos[:, :-1], segment_ids=seg[:, :-1], rng=rng)
        mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        if "loss_mask" in batch:
            mask &= batch["loss_mask"][:, 1:] > 0
        chunk = self.cfg.objective.loss_chunk
        if chunk:
            hidden, _ = model.hidden(tokens[:, :-1], **inputs)
            aux = chunked_cross_entropy(hidden, model.output_head(), tokens[:, 1:], mask, chunk=chunk)
        else:
            aux = token_cross_entropy(model(tokens[:, :-1], **inputs), tokens[:, 1:], mask)
        return aux.pop("loss"), aux
