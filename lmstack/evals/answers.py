"""Scoring generated answers against references, with lm-evaluation-harness's filters and metric.

- :func:`regex_extract` is lm-eval's ``RegexFilter`` (``lm_eval/filters/extraction.py``):
  all matches of the pattern, the one ``group_select`` picks (0 the first, -1 the last), its
  first non-empty group if the pattern has groups, stripped; ``"[invalid]"`` when nothing matches.
- :func:`normalise_answer` is the preprocessing of lm-eval's ``exact_match`` metric (from HF
  ``evaluate``), in its order: every ``regexes_to_ignore`` pattern deleted, then lower case
  (``ignore_case``), then ``string.punctuation`` deleted (``ignore_punctuation``).
- ``exact_match``: the normalised prediction equals the normalised reference;
  ``contains``: the normalised reference occurs in the normalised prediction.
"""

from __future__ import annotations

import re
import string
from typing import Sequence

INVALID = "[invalid]"
SCORINGS = ("exact_match", "contains", "regex")


def regex_extract(text: str, pattern: str, group_select: int = 0, fallback: str = INVALID) -> str:
    """The answer lm-eval's ``RegexFilter(pattern, group_select)`` takes from ``text``."""
    matches = re.findall(pattern, text)
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), fallback)
    return match.strip()


def normalise_answer(text: str, *, regexes_to_ignore: Sequence[str] = (), ignore_case: bool = False,
                     ignore_punctuation: bool = False) -> str:
    """``text`` as lm-eval's ``exact_match`` compares it (see the module docstring)."""
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text


def score_answer(prediction: str, reference: str, scoring: str, *, regex: str = "", strip: bool = True,
                 regexes_to_ignore: Sequence[str] = (), ignore_case: bool = False,
                 ignore_punctuation: bool = False) -> float:
    """1.0 or 0.0: ``prediction`` (stripped of surrounding whitespace with ``strip``) scored
    against ``reference`` by ``scoring``: ``exact_match``, ``contains``, or ``regex`` (the
    answer :func:`regex_extract` takes with ``regex`` from the prediction, then exact match)."""
    if scoring == "regex":
        prediction = regex_extract(prediction, regex)
    if strip:
        prediction, reference = prediction.strip(), reference.strip()
    norm = dict(regexes_to_ignore=regexes_to_ignore, ignore_case=ignore_case, ignore_punctuation=ignore_punctuation)
    pred, ref = normalise_answer(prediction, **norm), normalise_answer(reference, **norm)
    if scoring == "contains":
        return float(ref in pred)
    return float(pred == ref)
