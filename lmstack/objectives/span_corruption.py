"""T5 span corruption: noise spans in the inputs become sentinels; the targets spell them out.

The raw window length is chosen as T5 does, so that the corrupted inputs are exactly
``data.seq_len`` tokens; the targets length follows from it. Sentinels are the top
``objective.num_sentinels`` ids of the model's vocabulary (reserved above the tokenizer's).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lmstack.data.noise import span_corruption, span_corruption_lengths, top_of_vocab_ids
from lmstack.objectives.seq2seq import Seq2SeqObjective, seq2seq_features
from lmstack.registry import register


@register("objective.span_corruption")
class SpanCorruption(Seq2SeqObjective):
    def __init__(self, cfg: Any):
        super().__init__(cfg)
        o = cfg.objective
        self.raw_length, self.targets_length = span_corruption_lengths(
            cfg.data.seq_len, o.noise_density, o.mean_span_length, with_eos=False)
        self.sentinels = top_of_vocab_ids(cfg.model.vocab_size, o.num_sentinels)

    @classmethod
    def extra_tokens(cls, cfg: Any) -> int:
        return cfg.objective.num_sentinels

    def window_length(self) -> int:
        return self.raw_length

    def transform(self, window: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        o = self.cfg.objective
        inputs, targets, inputs_seg, targets_seg = span_corruption(
            window["tokens"], noise_density=o.noise_density, mean_span_length=o.mean_span_length,
            sentinel_ids=self.sentinels, rng=rng, segment_ids=window["segment_ids"])
        return seq2seq_features(inputs, inputs_seg, targets, targets_seg, inputs_length=self.cfg.data.seq_len,
                                targets_length=self.targets_length)
