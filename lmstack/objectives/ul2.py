"""UL2: a mixture of denoisers on the encoder-decoder, each announced by a mode token.

R (regular spans), X (extreme: dense or long spans) and S (sequential prefix LM), drawn per
example with ``objective.mixing_rates``. Sentinels are the top ``objective.num_sentinels``
ids of the model's vocabulary and the three mode tokens ([R], [X], [S]) sit just below them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lmstack.data.noise import default_ul2_denoisers, top_of_vocab_ids, ul2_example, ul2_window_length
from lmstack.objectives.seq2seq import Seq2SeqObjective, seq2seq_features
from lmstack.registry import register

MODES = ("R", "X", "S")


@register("objective.ul2")
class UL2(Seq2SeqObjective):
    def __init__(self, cfg: Any):
        super().__init__(cfg)
        o, v = cfg.objective, cfg.model.vocab_size
        self.sentinels = top_of_vocab_ids(v, o.num_sentinels)
        below = v - o.num_sentinels
        self.mode_ids = {m: below - 1 - i for i, m in enumerate(MODES)}
        self.denoisers = default_ul2_denoisers(self.mode_ids)
        self.targets_length = o.targets_length or cfg.data.seq_len

    @classmethod
    def extra_tokens(cls, cfg: Any) -> int:
        return cfg.objective.num_sentinels + len(MODES)

    def window_length(self) -> int:
        return ul2_window_length(self.denoisers, inputs_length=self.cfg.data.seq_len,
                                 targets_length=self.targets_length, with_eos=False)

    def transform(self, window: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        n = self.cfg.data.seq_len
        ex = ul2_example(window["tokens"], denoisers=self.denoisers, rates=self.cfg.objective.mixing_rates, rng=rng,
                         sentinel_ids=self.sentinels, inputs_length=n, targets_length=self.targets_length,
                         segment_ids=window["segment_ids"])
        return seq2seq_features(ex["inputs"], ex["inputs_segment_ids"], ex["targets"], ex["targets_segment_ids"],
                                inputs_length=n, targets_length=self.targets_length)
