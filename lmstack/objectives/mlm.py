"""Masked language modelling (BERT) on the encoder: 15% of the tokens (or whole words) are
selected; of those 80% become [MASK], 10% a random token, 10% stay; the loss is on the
selected positions only. [MASK] is the top id of the model's vocabulary.

Batches hold ``inputs``, ``targets`` (int32), ``loss_mask`` (bool) and the window's
``segment_ids`` and ``positions`` (int32, all ``(batch, seq_len)``): masking changes no
token's place, so each keeps its document, and the encoder attends within documents only."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from lmstack.data.noise import mlm_mask
from lmstack.data.token_table import TokenTable
from lmstack.data.tokenizers import Tokenizer
from lmstack.objectives.base import TransformedWindowObjective
from lmstack.objectives.causal_lm import token_cross_entropy
from lmstack.registry import register


@register("objective.mlm")
class MaskedLM(TransformedWindowObjective):
    config_defaults = dict(
        select_rate=0.15,  # BERT: 15% of tokens are selected for prediction
        mask_rate=0.8,  # of those, 80% become [MASK]
        random_rate=0.1,  # 10% a random token (the rest stay as they are)
        whole_word=False,  # select whole words (BERT's whole-word masking)
    )

    def __init__(self, cfg: Any, special_ids: Mapping[str, int]):
        super().__init__(cfg, special_ids)
        self.mask_id = special_ids["[MASK]"]
        self.table: TokenTable | None = None
        self.special: list[int] = []

    @classmethod
    def special_tokens(cls, cfg: Any) -> tuple[str, ...]:
        return ("[MASK]",)

    def bind(self, tok: Tokenizer) -> None:
        self.special = [i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None]
        self.table = TokenTable(tok) if self.cfg.objective.whole_word else None

    def transform(self, window: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        o = self.cfg.objective
        tokens, seg = window["tokens"], window["segment_ids"]
        word_starts = None
        if self.table is not None:  # a word never runs on into the next document
            word_starts = self.table.word_starts(tokens) | (seg != np.concatenate([seg[:1], seg[:-1]]))
        inputs, targets, loss_mask = mlm_mask(
            tokens, rng=rng, mask_id=self.mask_id, vocab_size=self.mask_id, select_rate=o.select_rate,
            mask_rate=o.mask_rate, random_rate=o.random_rate, special_ids=self.special, word_starts=word_starts)
        return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask, "segment_ids": seg,
                "positions": window["positions"]}

    def loss_fn(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array | None):
        hidden = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"], rng=rng)
        aux = token_cross_entropy(model.lm_logits(hidden), batch["targets"], batch["loss_mask"])
        return aux.pop("loss"), aux
