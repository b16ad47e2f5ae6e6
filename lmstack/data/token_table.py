"""Per-id facts about a tokenizer's vocabulary that noising functions need: where words
start and which ids end a sentence, read off each id's decoded text, so they work the same
for SentencePiece, byte and character tokenizers."""

from __future__ import annotations

import numpy as np

from lmstack.data.tokenizers import Tokenizer


class TokenTable:
    def __init__(self, tok: Tokenizer):
        texts = [tok.decode([i]) for i in range(tok.vocab_size)]
        self.leading_space = np.array([t[:1].isspace() for t in texts])
        self.trailing_space = np.array([t[-1:].isspace() for t in texts])
        ends = [i for i, t in enumerate(texts) if t.rstrip(" ").endswith((".", "!", "?", "\n"))]
        self.sentence_end_ids = np.asarray(ends, np.int32)

    def word_starts(self, ids: np.ndarray) -> np.ndarray:
        """True where a token begins a word: the first token, a token whose text starts with
        whitespace, or one right after a token whose text ends with whitespace. Ids beyond the
        tokenizer's vocabulary (reserved ids) count as words of their own."""
        ids = np.asarray(ids)
        known = ids < len(self.leading_space)
        safe = np.where(known, ids, 0)
        starts = self.leading_space[safe] | ~known
        starts[1:] |= self.trailing_space[safe[:-1]] | ~known[:-1]
        starts[:1] = True
        return starts
