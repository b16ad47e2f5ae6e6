"""T5 span corruption: noise spans in the inputs become sentinels; the targets spell them out.

The raw window length is chosen as T5 does, so that the corrupted inputs are exactly
``data.seq_len`` tokens; the targets length follows from it. Sentinels are the special
tokens ``<extra_id_0>`` ... (T5's names), reserved above the tokenizer's vocabulary: in a
fresh run ``<extra_id_0>`` is the top id of the vocabulary and the others count down.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from lmstack.data.noise import span_corruption, span_corruption_lengths
from lmstack.objectives.seq2seq import Seq2SeqObjective, sentinel_ids, sentinel_names, seq2seq_features
from lmstack.registry import register


@register("objective.span_corruption")
class SpanCorruption(Seq2SeqObjective):
    config_defaults = dict(
        noise_density=0.15,  # fraction of tokens in noise spans (T5: 0.15)
        mean_span_length=3.0,  # T5: 3
        num_sentinels=100,  # reserved ids <extra_id_0> ... (T5: 100)
    )

    def __init__(self, cfg: Any, special_ids: Mapping[str, int]):
        super().__init__(cfg, special_ids)
        o = cfg.objective
        self.raw_length, self.targets_length = span_corruption_lengths(
            cfg.data.seq_len, o.noise_density, o.mean_span_length, with_eos=False)
        self.sentinels = sentinel_ids(special_ids, o.num_sentinels)

    @classmethod
    def special_tokens(cls, cfg: Any) -> tuple[str, ...]:
        return sentinel_names(cfg.objective.num_sentinels)

    def window_length(self) -> int:
        return self.raw_length

    def transform(self, window: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        o = self.cfg.objective
        inputs, targets, inputs_seg, targets_seg = span_corruption(
            window["tokens"], noise_density=o.noise_density, mean_span_length=o.mean_span_length,
            sentinel_ids=self.sentinels, rng=rng, segment_ids=window["segment_ids"])
        return seq2seq_features(inputs, inputs_seg, targets, targets_seg, inputs_length=self.cfg.data.seq_len,
                                targets_length=self.targets_length)
