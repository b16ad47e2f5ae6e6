"""The registered verifiable rewards and the reward registry's error."""

import pytest

from lmstack import registry
from lmstack.config import ConfigError
from lmstack.rl.rewards import reward_fn

GSM8K_ANSWER = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.mark.parametrize("completion, strict, flexible", [
    ("She sold 48 + 24 = 72 clips.\n#### 72", 1.0, 1.0),
    ("She sold 72 clips in total.", 0.0, 1.0),          # no "#### N": only the last number counts
    ("#### 72\nbut then 10 more", 1.0, 0.0),             # the first "####" vs the last number
    ("#### $1,072.", 0.0, 0.0),
])
def test_gsm8k_strict_and_flexible(completion, strict, flexible):
    assert reward_fn("gsm8k_strict")(completion, GSM8K_ANSWER) == strict
    assert reward_fn("gsm8k_flexible")(completion, GSM8K_ANSWER) == flexible


def test_gsm8k_ignores_commas_dollars_and_a_final_stop_like_lm_eval():
    assert reward_fn("gsm8k_strict")("#### 1,800", "so #### 1800") == 1.0
    assert reward_fn("gsm8k_strict")("#### $1,800", "so #### 1800") == 0.0  # lm-eval's strict regex has no "$"
    assert reward_fn("gsm8k_flexible")("The total is $1,800.", "so #### 1800") == 1.0


def test_exact_match_strips_surrounding_whitespace_only():
    em = reward_fn("exact_match")
    assert em(" 357\n", "357") == 1.0
    assert em("3570", "357") == 0.0
    assert em("357.", "357") == 0.0


def test_rewards_are_registered_and_an_unknown_name_is_one_line():
    builtin = [n for n in registry.names("reward") if not n.startswith("test_")]  # RL tests register test_*
    assert builtin == ["exact_match", "gsm8k_flexible", "gsm8k_strict"]
    with pytest.raises(ConfigError) as e:
        reward_fn("gsm8k_strictt")
    assert str(e.value).startswith("objective.reward: unknown reward 'gsm8k_strictt': did you mean gsm8k_strict? "
                                   "registered: exact_match, gsm8k_flexible, gsm8k_strict")
