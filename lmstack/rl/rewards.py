"""Verifiable rewards: registered functions ``(completion, answer) -> float`` named ``reward.NAME``.

- ``gsm8k_strict``: 1.0 when the completion's first ``#### N`` equals the reference's final
  number (lm-eval ``exact_match,strict-match``), else 0.0;
- ``gsm8k_flexible``: the same with the completion's last number (lm-eval ``flexible-extract``);
  both through :func:`lmstack.evals.gsm8k.gsm8k_scores`, so training rewards and the GSM8K
  evaluator agree exactly; ``answer`` is the dataset's worked answer ending ``#### N`` (a bare
  number works too);
- ``exact_match``: 1.0 when the completion equals the answer after stripping surrounding
  whitespace (lm-eval ``exact_match`` with no normalisation), the reward of
  :mod:`lmstack.rl.tasks`.
"""

from __future__ import annotations

from typing import Callable

from lmstack.config import ConfigError
from lmstack.evals.answers import score_answer
from lmstack.evals.gsm8k import gsm8k_scores
from lmstack.registry import UnknownNameError, lookup, register

RewardFn = Callable[[str, str], float]


@register("reward.gsm8k_strict")
def gsm8k_strict(completion: str, answer: str) -> float:
    """1.0 if ``completion``'s ``#### N`` matches ``answer``'s final number, else 0.0."""
    return gsm8k_scores(completion, answer)["strict_match"]


@register("reward.gsm8k_flexible")
def gsm8k_flexible(completion: str, answer: str) -> float:
    """1.0 if the last number in ``completion`` matches ``answer``'s final number, else 0.0."""
    return gsm8k_scores(completion, answer)["flexible_extract"]


@register("reward.exact_match")
def exact_match(completion: str, answer: str) -> float:
    """1.0 if ``completion.strip() == answer.strip()``, else 0.0."""
    return score_answer(completion, answer, "exact_match")


def reward_fn(name: str, key: str = "objective.reward") -> RewardFn:
    """The reward function registered as ``reward.{name}``; ConfigError (one line naming ``key``,
    the closest names and every registered one) for a name that is not registered."""
    try:
        return lookup("reward", name, key)
    except UnknownNameError as e:
        raise ConfigError(str(e)) from None
