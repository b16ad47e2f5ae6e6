"""BART denoising on the encoder-decoder: text infilling (Poisson span lengths, one mask
token per span) and/or sentence permutation; the target is the original window.

``objective.denoise`` picks ``infilling``, ``permutation`` or ``both`` (BART's best); the
mask token is the special token ``<mask>`` (BART's name), reserved above the tokenizer's vocabulary.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from lmstack.data.noise import sentence_permutation, text_infilling
from lmstack.data.token_table import TokenTable
from lmstack.data.tokenizers import Tokenizer
from lmstack.objectives.seq2seq import Seq2SeqObjective, seq2seq_features
from lmstack.registry import register


@register("objective.denoising")
class Denoising(Seq2SeqObjective):
    config_defaults = dict(
        denoise="both",  # infilling | permutation | both (BART's best)
        mask_ratio=0.3,  # fraction of tokens in masked spans (BART: 0.3)
        poisson_lambda=3.0,  # span lengths ~ Poisson(3), as BART
    )
    config_choices = {"denoise": ("infilling", "permutation", "both")}

    def __init__(self, cfg: Any, special_ids: Mapping[str, int]):
        super().__init__(cfg, special_ids)
        self.mask_id = special_ids["<mask>"]
        self.sentence_ends = np.zeros(0, np.int32)

    @classmethod
    def special_tokens(cls, cfg: Any) -> tuple[str, ...]:
        return ("<mask>",)

    def bind(self, tokenizer: Tokenizer) -> None:
        self.sentence_ends = TokenTable(tokenizer).sentence_end_ids

    def transform(self, window: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        o, n = self.cfg.objective, self.cfg.data.seq_len
        tokens, seg = window["tokens"], window["segment_ids"]
        noisy, noisy_seg = tokens, seg
        if o.denoise in ("permutation", "both") and len(self.sentence_ends):
            noisy, noisy_seg = sentence_permutation(noisy, rng=rng, sentence_end_ids=self.sentence_ends,
                                                    segment_ids=noisy_seg)
        if o.denoise in ("infilling", "both"):
            noisy, noisy_seg = text_infilling(noisy, rng=rng, mask_id=self.mask_id, mask_ratio=o.mask_ratio,
                                              poisson_lambda=o.poisson_lambda, segment_ids=noisy_seg)
        return seq2seq_features(noisy, noisy_seg, tokens, seg, inputs_length=n, targets_length=n)
