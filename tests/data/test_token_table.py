"""Word starts and sentence ends from decoded ids."""

import numpy as np

from lmstack.data.token_table import TokenTable
from lmstack.data.tokenizers import ByteTokenizer, CharTokenizer


def test_word_starts_with_a_char_tokenizer():
    tok = CharTokenizer.from_documents(["the cat sat. on the mat!\n"])
    table = TokenTable(tok)
    text = "the cat sat. on"
    ids = np.asarray(tok.encode(text))
    starts = table.word_starts(ids)
    # a word starts at index 0 and right after every space; spaces start "words" of their own
    expected = [i == 0 or text[i].isspace() or text[i - 1].isspace() for i in range(len(text))]
    np.testing.assert_array_equal(starts, expected)
    ends = {tok.decode([i]) for i in table.sentence_end_ids}
    assert ends == {".", "!", "\n"}


def test_reserved_ids_are_words_of_their_own():
    tok = ByteTokenizer()
    table = TokenTable(tok)
    ids = np.asarray(tok.encode("ab") + [300] + tok.encode("cd"))
    np.testing.assert_array_equal(table.word_starts(ids), [True, False, True, True, False])
