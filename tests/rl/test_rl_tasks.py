"""The synthetic addition task: correct answers, seeded draws, a held-out split disjoint from train."""

import numpy as np
import pytest

from lmstack.config import ConfigError
from lmstack.rl.tasks import addition_problems, in_test_split


def test_answers_are_the_sums():
    for p in addition_problems(200, digits=3, split="train", seed=0):
        a, b = p["prompt"].removesuffix("=").split("+")
        assert p["answer"] == str(int(a) + int(b)) and p["prompt"] == f"{int(a)}+{int(b)}="


def test_test_split_shares_no_problem_with_train_whatever_the_seeds():
    train = {p["prompt"] for seed in (0, 1) for p in addition_problems(4000, digits=2, split="train", seed=seed)}
    test = [p["prompt"] for seed in (0, 7) for p in addition_problems(400, digits=2, split="test", seed=seed)]
    assert len(train) > 4000 and len(set(test)) > 400
    assert train.isdisjoint(test)


def test_draws_are_distinct_seeded_and_the_split_share_is_the_fraction():
    a = addition_problems(300, digits=3, split="test", seed=3)
    assert a == addition_problems(300, digits=3, split="test", seed=3)
    assert a != addition_problems(300, digits=3, split="test", seed=4)
    assert len({p["prompt"] for p in a}) == 300
    share = in_test_split(np.arange(10 ** 6), 0.1).mean()
    assert abs(share - 0.1) < 0.003  # 1e6 pairs: the binomial std of the share is 3e-4


def test_bad_requests_are_one_line():
    with pytest.raises(ConfigError) as e:
        addition_problems(10, digits=1, split="test", seed=0)
    assert str(e.value) == ("addition task: 10 test problems asked, the 1-digit test split holds 8: ask for at most "
                            "half of it or raise digits")
    with pytest.raises(ConfigError) as e:
        addition_problems(10, digits=2, split="validation", seed=0)
    assert str(e.value) == "addition task split='validation': unknown; choose one of train, test"
    with pytest.raises(ConfigError) as e:
        addition_problems(10, digits=10, split="train", seed=0)
    assert str(e.value) == "addition task digits=10: must be 1 to 9 (problems are indexed in 64 bits)"
