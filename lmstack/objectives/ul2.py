"""UL2: a mixture of denoisers on the encoder-decoder, each announced by a mode token.

R (regular spans), X (extreme: dense or long spans) and S (sequential prefix LM), drawn per
example with ``objective.mixing_rates``. Sentinels are the top ``objective.num_sentinels``
ids of the model's vocabulary and the three mode tokens ([R], [X], [S]) sit just below them.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from lmstack.data.noise import default_ul2_denoisers, ul2_example, ul2_window_length
from lmstack.objectives.seq2seq import Seq2SeqObjective, sentinel_ids, sentinel_names, seq2seq_features
from lmstack.registry import register

MODES = ("R", "X", "S")
# The mode tokens' names, as the UL2 paper writes them: [NLU] for R, [NLG] for X, [S2S] for S.
MODE_TOKENS = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}


@register("objective.ul2")
class UL2(Seq2SeqObjective):
    config_defaults = dict(
        num_sentinels=100,  # reserved ids <extra_id_0> ... (T5: 100)
        targets_length=0,  # decoder length; 0: data.seq_len
        # rates of the R, X (dense), X (long spans) and S denoisers
        mixing_rates=(0.4, 0.2, 0.2, 0.2),
    )

    def __init__(self, cfg: Any, special_ids: Mapping[str, int]):
        super().__init__(cfg, special_ids)
        o = cfg.objective
        self.sentinels = sentinel_ids(special_ids, o.num_sentinels)
        self.mode_ids = {m: special_ids[MODE_TOKENS[m]] for m in MODES}
        self.denoisers = default_ul2_denoisers(self.mode_ids)
        self.targets_length = o.targets_length or cfg.data.seq_len

    @classmethod
    def special_tokens(cls, cfg: Any) -> tuple[str, ...]:
        return sentinel_names(cfg.objective.num_sentinels) + tuple(MODE_TOKENS[m] for m in MODES)

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
