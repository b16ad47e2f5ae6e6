"""Answer extraction and matching: lm-eval's RegexFilter, exact_match preprocessing, GSM8K."""

import pytest

from lmstack.evals.answers import normalise_answer, regex_extract, score_answer
from lmstack.evals.gsm8k import FLEXIBLE, STRICT, gsm8k_scores


def test_regex_filter_like_lm_eval():
    assert regex_extract("so #### 1,234.\nmore #### 7", STRICT) == "1,234."  # the first match
    assert regex_extract("no marker here", STRICT) == "[invalid]"
    # groups: the last match's first non-empty group
    assert regex_extract("3 apples cost $4.50, total 12", FLEXIBLE, group_select=-1) == "12"
    assert regex_extract("costs $4.50", FLEXIBLE, group_select=-1) == "$4.50"
    assert regex_extract("x = -7", FLEXIBLE, group_select=-1) == "-7"


def test_exact_match_preprocessing_order():
    # regexes first, then case, then punctuation (HF evaluate's exact_match)
    assert normalise_answer("The Answer: Paris!", regexes_to_ignore=(r"^The Answer: ",), ignore_case=True) == "paris!"
    # the patterns see the text before lower-casing
    assert normalise_answer("The Answer: Paris!", regexes_to_ignore=(r"^the answer: ",),
                            ignore_case=True) == "the answer: paris!"
    assert normalise_answer("Paris!", ignore_punctuation=True) == "Paris"


@pytest.mark.parametrize("prediction,reference,scoring,settings,expected", [
    (" Paris\n", "Paris", "exact_match", {}, 1.0),
    (" Paris\n", "Paris", "exact_match", {"strip": False}, 0.0),
    ("paris.", "Paris", "exact_match", {"ignore_case": True, "ignore_punctuation": True}, 1.0),
    ("It is Paris, I think", "Paris", "contains", {}, 1.0),
    ("It is paris", "Paris", "contains", {}, 0.0),
    ("reasoning... #### 42", "42", "regex", {"regex": r"#### (\d+)"}, 1.0),
    ("reasoning... 42", "42", "regex", {"regex": r"#### (\d+)"}, 0.0),
])
def test_score_answer(prediction, reference, scoring, settings, expected):
    assert score_answer(prediction, reference, scoring, **settings) == expected


@pytest.mark.parametrize("output,strict,flexible", [
    (" She sells 9 eggs at $2 each.\n#### 18", 1.0, 1.0),
    (" 9 * 2 = $18 a day, so she makes $18.", 0.0, 1.0),  # no ####: only the flexible answer
    (" #### 18\nThen 20 more.", 1.0, 0.0),  # flexible takes the last number
    (" #### $18.", 0.0, 1.0),  # strict wants digits right after "#### "; "$18." normalises to 18
    (" #### 1,8", 1.0, 1.0),  # commas are removed before comparing
    (" #### 17", 0.0, 0.0),
])
def test_gsm8k_strict_and_flexible(output, strict, flexible):
    answer = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    assert gsm8k_scores(output, answer) == {"strict_match": strict, "flexible_extract": flexible}
