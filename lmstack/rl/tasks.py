"""A synthetic verifiable task generated offline: multi-digit addition, ``"12+345="`` -> ``"357"``.

Small enough for a small model to learn on CPU, checked by ``reward.exact_match``. Each problem
``(a, b)`` with ``0 <= a, b < 10**digits`` belongs to exactly one split, fixed by a hash of the
pair (splitmix64 of ``a * 10**digits + b``) and independent of the sampling seed, so the held-out
split never shares a problem with train whatever seeds the two were drawn with. A draw holds no
repeated problem.

:func:`addition_files` writes both splits as ``prompt_completion`` JSONL under the lmstack
cache (``$LMSTACK_CACHE``), what ``experiments/sft_addition.py`` and ``grpo_addition.py`` read.
"""

from __future__ import annotations

import pathlib

import numpy as np

from lmstack.config import ConfigError
from lmstack.data.formats import task_files

SPLITS = ("train", "test")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Steele et al.'s splitmix64 finaliser on uint64 (wrapping arithmetic)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def in_test_split(index: np.ndarray, test_fraction: float) -> np.ndarray:
    """bool, ``index``'s shape: whether problem ``index = a * 10**digits + b`` is held out."""
    with np.errstate(over="ignore"):
        h = _splitmix64(np.asarray(index, np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < test_fraction


def addition_problems(n: int, *, digits: int, split: str, seed: int,
                      test_fraction: float = 0.1) -> list[dict[str, str]]:
    """``n`` distinct problems ``{"prompt": "a+b=", "answer": str(a + b)}`` of ``split``
    (``train`` or ``test``) with operands below ``10**digits``, drawn with numpy ``seed``.
    ``test_fraction`` of all pairs is held out (the same fraction must be used for both splits).
    ConfigError for an unknown split, digits outside 1..9, a fraction outside (0, 1), or ``n``
    above half of the split's size (ask for fewer or use more digits)."""
    if split not in SPLITS:
        raise ConfigError(f"addition task split={split!r}: unknown; choose one of {', '.join(SPLITS)}")
    if not 1 <= digits <= 9:
        raise ConfigError(f"addition task digits={digits}: must be 1 to 9 (problems are indexed in 64 bits)")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"addition task test_fraction={test_fraction}: must lie strictly between 0 and 1")
    base = 10 ** digits
    want_test = split == "test"
    share = test_fraction if want_test else 1.0 - test_fraction
    # exact split size where counting is cheap; beyond 10**6 pairs the hash's share is within 0.1%
    size = (int(np.count_nonzero(in_test_split(np.arange(base * base), test_fraction) == want_test))
            if base * base <= 10 ** 6 else int(base * base * share))
    if n > size / 2:
        raise ConfigError(f"addition task: {n} {split} problems asked, the {digits}-digit {split} split holds "
                          f"{size}: ask for at most half of it or raise digits")
    rng = np.random.default_rng(seed)
    chosen: dict[int, None] = {}  # insertion-ordered set: the draw order is the output order
    while len(chosen) < n:
        # enough candidates that about twice the missing number fall in the split (at most half of
        # which were drawn before, since n <= size / 2)
        cand = rng.integers(0, base * base, size=int(2 * (n - len(chosen)) / share) + 16, dtype=np.uint64)
        for i in cand[in_test_split(cand, test_fraction) == want_test]:
            chosen.setdefault(int(i), None)
            if len(chosen) == n:
                break
    problems = []
    for i in chosen:
        a, b = divmod(i, base)
        problems.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return problems


def addition_files(*, digits: int, n_train: int, n_test: int, seed: int = 0,
                   test_fraction: float = 0.1) -> dict[str, pathlib.Path]:
    """``{"train": PATH, "test": PATH}``: :func:`addition_problems` of each split as
    ``prompt_completion`` JSONL (``{"prompt": "12+345=", "completion": "357"}`` per line) under
    ``$LMSTACK_CACHE/tasks/`` (default ``~/.cache/lmstack``), in a folder named by every argument,
    written once (:func:`lmstack.data.formats.task_files`). ConfigError as :func:`addition_problems`."""
    def rows(split: str, n: int):
        return lambda: [{"prompt": p["prompt"], "completion": p["answer"]} for p in addition_problems(
            n, digits=digits, split=split, seed=seed, test_fraction=test_fraction)]

    return task_files(f"addition-d{digits}-train{n_train}-test{n_test}-seed{seed}-f{test_fraction:g}",
                      {"train": rows("train", n_train), "test": rows("test", n_test)})
