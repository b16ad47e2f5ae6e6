"""The synthetic addition task: correct answers, seeded draws, a held-out split disjoint from train,
written once to the cache as prompt_completion JSONL."""

import json

import numpy as np
import pytest

from lmstack.config import ConfigError
from lmstack.rl.tasks import addition_files, addition_problems, in_test_split


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


def test_files_hold_the_problems_and_are_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSTACK_CACHE", str(tmp_path))
    paths = addition_files(digits=2, n_train=30, n_test=5, seed=3)
    assert paths["train"].parent.parent == tmp_path / "tasks"
    for split, n in (("train", 30), ("test", 5)):
        rows = [json.loads(line) for line in paths[split].read_text().splitlines()]
        assert rows == [{"prompt": p["prompt"], "completion": p["answer"]}
                        for p in addition_problems(n, digits=2, split=split, seed=3)]
    stamp = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    assert addition_files(digits=2, n_train=30, n_test=5, seed=3) == paths
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == stamp  # kept, not rewritten
    assert addition_files(digits=2, n_train=30, n_test=5, seed=4)["train"] != paths["train"]
    assert sorted(q.name for q in paths["train"].parent.iterdir()) == ["test.jsonl", "train.jsonl"]
