"""Noising functions of pre-training objectives: pure numpy, run per example in the data pipeline.

Every function takes its settings as explicit arguments and its randomness from an explicit
``np.random.Generator`` (the pipeline seeds one per example), so its output is a function of
``(tokens, settings, seed)``. Bad settings raise :class:`DataError` naming the config key.

Documents: a window may hold several documents, numbered by ``segment_ids`` (1, 2, ...; see
``lmstack.data.pipeline``). Noise is drawn over the whole window (as T5 corrupts a chunk of
concatenated documents), and every output token carries the segment id of the raw token it
stands for: a kept, moved or masked token its own, an inserted sentinel or mask token that
of the first token of its span (a span of length 0: of the token after it), an EOS that of
the last token. Models attend only between equal segment ids, so no document sees another.
``segment_ids=None`` means one document (all ones).

- T5 span corruption: :func:`random_spans_noise_mask`, :func:`span_corruption_lengths`,
  :func:`span_corruption` and its inverse :func:`reassemble`.
- BERT masked LM: :func:`mlm_mask`.
- BART denoising: :func:`text_infilling`, :func:`sentence_permutation`.
- UL2's mixture of denoisers: :class:`Denoiser`, :func:`default_ul2_denoisers`, :func:`ul2_example`.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from typing import Mapping, Sequence

import numpy as np

from lmstack.data.sources import DataError

IntArray = np.ndarray


def top_of_vocab_ids(vocab_size: int, count: int) -> IntArray:
    """``count`` ids from the top of the vocabulary, descending (``vocab_size - 1`` first), as
    T5 takes its sentinels."""
    if not 0 <= count <= vocab_size:
        raise DataError(
            f"objective.num_sentinels: {count} sentinels do not fit in a vocabulary of {vocab_size}: "
            "pass a count between 0 and the vocabulary size"
        )
    return np.arange(vocab_size - 1, vocab_size - 1 - count, -1, dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# T5 span corruption


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """T5's noise mask: bool ``[length]``, True on the tokens to corrupt.

    ``round(length * noise_density)`` noise tokens (at least 1, at most ``length - 1``) in
    ``round(noise_tokens / mean_span_length)`` spans (at least 1): noise and non-noise tokens are
    each cut into that many non-empty spans uniformly at random, and the spans interleave
    starting with non-noise, so the mask starts False and ends True. Where there would be more
    spans than non-noise tokens (density near 1 with short spans, which T5 itself cannot do),
    the span count is capped at the non-noise count. Sequences shorter than 2 get no noise.
    """
    _check_span_args(noise_density, mean_span_length)
    if mean_span_length > length:
        raise DataError(
            f"objective.mean_span_length: {mean_span_length} is longer than the {length}-token "
            "sequence: lower objective.mean_span_length or raise data.seq_len"
        )
    n_noise, n_spans = _span_counts(length, noise_density, mean_span_length)
    if n_spans == 0:
        return np.zeros(length, bool)
    noise_lengths = _random_segmentation(n_noise, n_spans, rng)
    kept_lengths = _random_segmentation(length - n_noise, n_spans, rng)
    interleaved = np.stack([kept_lengths, noise_lengths], axis=1).ravel()
    return np.repeat(np.tile([False, True], n_spans), interleaved)


@functools.lru_cache(maxsize=256)
def span_corruption_lengths(
    inputs_length: int, noise_density: float, mean_span_length: float, *, with_eos: bool = True
) -> tuple[int, int]:
    """``(raw_tokens_length, targets_length)``: T5's ``random_spans_helper``.

    The largest raw length whose corrupted inputs (non-noise tokens, one sentinel per span and,
    ``with_eos``, an EOS) fit in ``inputs_length``; here they always fill it exactly, else this
    raises. ``targets_length`` is what the targets (a sentinel per span, the noise tokens, EOS)
    then hold. Counts use :func:`random_spans_noise_mask`'s own rules, so lengths are exact for
    every example. T5's extra trim at density 0.5 is left out: it would make inputs one short.
    """
    _check_span_args(noise_density, mean_span_length)
    extra = int(with_eos)

    def lengths(n: int) -> tuple[int, int]:
        n_noise, n_spans = _span_counts(n, noise_density, mean_span_length)
        return n - n_noise + n_spans + extra, n_noise + n_spans + extra

    # Inputs grow by 0, 1 or 2 tokens per raw token, so the largest fitting raw length is a bisection.
    lo, hi = max(inputs_length - extra, 0), int((inputs_length + 1) / (1 - noise_density)) + 2
    raw = lo + bisect.bisect_right(range(lo, hi), inputs_length, key=lambda n: lengths(n)[0]) - 1
    if raw < 2:
        raise DataError(
            f"data.seq_len: inputs of {inputs_length} tokens leave no room for a noise span: "
            "raise data.seq_len"
        )
    if lengths(raw)[0] != inputs_length:
        raise DataError(
            f"objective.noise_density: {noise_density} with mean_span_length {mean_span_length} "
            f"asks for more noise spans than non-noise tokens, so no raw length corrupts to exactly "
            f"{inputs_length} tokens: lower objective.noise_density (to well below mean_span_length / "
            f"(mean_span_length + 1) = {mean_span_length / (mean_span_length + 1):.3g}) or raise "
            "objective.mean_span_length"
        )
    if mean_span_length > raw:
        raise DataError(
            f"objective.mean_span_length: {mean_span_length} is longer than the {raw} raw tokens "
            f"behind inputs of {inputs_length}: lower objective.mean_span_length or raise data.seq_len"
        )
    return raw, lengths(raw)[1]


def span_corruption(
    tokens: IntArray,
    *,
    noise_density: float,
    mean_span_length: float,
    sentinel_ids: Sequence[int],
    rng: np.random.Generator,
    eos_id: int | None = None,
    segment_ids: IntArray | None = None,
) -> tuple[IntArray, IntArray, IntArray, IntArray]:
    """T5's span corruption: ``(inputs, targets, inputs_segment_ids, targets_segment_ids)``, int32.

    In the inputs, noise span ``k`` becomes the single token ``sentinel_ids[k]``; the targets
    are, for each span in order, its sentinel followed by its tokens. With ``eos_id`` both end
    with it. Pass the top ids of the vocabulary in descending order (:func:`top_of_vocab_ids`),
    as T5 does, and ids the tokens never use. Segment ids follow the module's rule.
    """
    tokens = np.asarray(tokens)
    seg = _segments(tokens, segment_ids)
    sentinel_ids = np.asarray(sentinel_ids, np.int64)
    _check_span_args(noise_density, mean_span_length)
    n_spans = _span_counts(len(tokens), noise_density, mean_span_length)[1]
    if n_spans > len(sentinel_ids):
        raise DataError(
            f"objective.num_sentinels: {len(sentinel_ids)} sentinel ids for {n_spans} noise spans "
            f"({len(tokens)} tokens, noise_density {noise_density}, mean_span_length {mean_span_length}): "
            f"raise objective.num_sentinels to at least {n_spans} or corrupt fewer, longer spans"
        )
    mask = random_spans_noise_mask(len(tokens), noise_density, mean_span_length, rng)
    first = mask & ~np.concatenate([[False], mask[:-1]])
    sentinels = sentinel_ids[np.maximum(np.cumsum(first) - 1, 0)] if n_spans else tokens
    inputs = _interleave(sentinels, first, tokens, ~mask)
    targets = _interleave(sentinels, first, tokens, mask)
    inputs_seg = _interleave(seg, first, seg, ~mask)
    targets_seg = _interleave(seg, first, seg, mask)
    eos_seg = None if eos_id is None else _last_segment(seg)
    return (_with_eos(inputs, eos_id), _with_eos(targets, eos_id),
            _with_eos(inputs_seg, eos_seg), _with_eos(targets_seg, eos_seg))


def reassemble(
    inputs: IntArray, targets: IntArray, sentinel_ids: Sequence[int], eos_id: int | None = None
) -> IntArray:
    """The tokens :func:`span_corruption` started from: each sentinel in ``inputs`` replaced by
    the tokens after the same sentinel in ``targets`` (for tests and debugging)."""
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    if eos_id is not None:
        if not (len(inputs) and len(targets) and inputs[-1] == eos_id and targets[-1] == eos_id):
            raise DataError(f"reassemble: inputs and targets must both end with eos_id {eos_id}")
        inputs, targets = inputs[:-1], targets[:-1]
    at = np.flatnonzero(np.isin(targets, sentinel_ids))
    if len(targets) and (not len(at) or at[0] != 0):
        raise DataError("reassemble: targets must start with a sentinel id")
    spans = {int(targets[s]): targets[s + 1 : e] for s, e in zip(at, [*at[1:], len(targets)])}
    pieces, start = [], 0
    for i in np.flatnonzero(np.isin(inputs, sentinel_ids)):
        if int(inputs[i]) not in spans:
            raise DataError(f"reassemble: sentinel {int(inputs[i])} of the inputs is not in the targets")
        pieces += [inputs[start:i], spans[int(inputs[i])]]
        start = i + 1
    pieces.append(inputs[start:])
    return np.concatenate(pieces).astype(np.int32)


def _check_span_args(noise_density: float, mean_span_length: float) -> None:
    if not 0 < noise_density < 1:
        raise DataError(
            f"objective.noise_density: {noise_density} is outside (0, 1): pass the fraction of "
            "tokens to corrupt, e.g. --config.objective.noise_density=0.15"
        )
    if not mean_span_length >= 1:
        raise DataError(
            f"objective.mean_span_length: {mean_span_length} is below 1 token: pass e.g. "
            "--config.objective.mean_span_length=3.0"
        )


def _span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a ``length``-token mask: the one place they are counted."""
    if length < 2:
        return 0, 0
    # Python's round() rounds half to even, as tf.round in T5 does.
    n_noise = min(max(round(length * noise_density), 1), length - 1)
    n_spans = min(max(round(n_noise / mean_span_length), 1), length - n_noise)
    return n_noise, n_spans


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> IntArray:
    """Lengths of ``num_segments`` non-empty segments summing to ``num_items``, every such
    composition equally likely (T5 shuffles the same set of cut points)."""
    cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def _interleave(a: IntArray, keep_a: np.ndarray, b: IntArray, keep_b: np.ndarray) -> IntArray:
    """For each position i: ``a[i]`` if ``keep_a[i]``, then ``b[i]`` if ``keep_b[i]``."""
    values = np.stack([np.broadcast_to(a, b.shape), b], axis=1).ravel()
    keep = np.stack([keep_a, keep_b], axis=1).ravel()
    return values[keep].astype(np.int32)


def _with_eos(x: IntArray, eos_id: int | None) -> IntArray:
    return x if eos_id is None else np.append(x, np.int32(eos_id))


def _segments(tokens: IntArray, segment_ids: IntArray | None) -> IntArray:
    """The tokens' segment ids as int32 (None: one document, all ones)."""
    if segment_ids is None:
        return np.ones(len(tokens), np.int32)
    seg = np.asarray(segment_ids, np.int32)
    if seg.shape != np.shape(tokens):
        raise DataError(f"noise segment_ids: shape {seg.shape} differs from the tokens' {np.shape(tokens)}: "
                        "pass one segment id per token")
    return seg


def _last_segment(seg: IntArray) -> int:
    return int(seg[-1]) if len(seg) else 1


# ---------------------------------------------------------------------------------------------
# BERT masked LM


def mlm_mask(
    tokens: IntArray,
    *,
    rng: np.random.Generator,
    mask_id: int,
    vocab_size: int,
    select_rate: float = 0.15,
    mask_rate: float = 0.8,
    random_rate: float = 0.1,
    word_starts: np.ndarray | None = None,
    special_ids: Sequence[int] = (),
) -> tuple[IntArray, IntArray, np.ndarray]:
    """BERT's masking: ``(inputs, targets, loss_mask)``; targets are the tokens unchanged.

    ``round(select_rate * candidates)`` (at least 1) positions are selected, as BERT does;
    without ``word_starts`` the candidates are the non-special tokens, with it (bool, True on
    the first token of each word) whole words, and a word's tokens are selected together (a
    special token is a word of its own and never selected). Each selected token independently
    becomes ``mask_id`` (``mask_rate``), a uniform random id in ``[0, vocab_size)`` other than
    a special id or ``mask_id`` (``random_rate``), or stays. ``loss_mask`` is True exactly on
    the selected positions.
    """
    tokens = np.asarray(tokens)
    n = len(tokens)
    if not 0 < select_rate <= 1:
        raise DataError(f"objective.select_rate: {select_rate} is outside (0, 1]: pass e.g. 0.15")
    if not (mask_rate >= 0 and random_rate >= 0 and mask_rate + random_rate <= 1):
        raise DataError(
            f"objective.mask_rate: mask_rate {mask_rate} and random_rate {random_rate} must be >= 0 "
            "and sum to at most 1: pass e.g. 0.8 and 0.1"
        )
    special = np.isin(tokens, np.asarray(special_ids, np.int64))
    boundary = np.ones(n, bool)
    if word_starts is not None:
        word_starts = np.asarray(word_starts, bool)
        if word_starts.shape != tokens.shape:
            raise DataError(
                f"mlm word_starts: shape {word_starts.shape} differs from the tokens' {tokens.shape}: "
                "pass one flag per token"
            )
        boundary = word_starts | special | np.concatenate([[True], special[:-1]])
    word = np.cumsum(boundary) - 1
    n_words = int(word[-1]) + 1 if n else 0
    candidates = np.flatnonzero(np.bincount(word, weights=special, minlength=n_words) == 0)
    k = min(max(round(len(candidates) * select_rate), 1), len(candidates))
    selected = np.zeros(n_words, bool)
    selected[rng.choice(candidates, k, replace=False)] = True
    loss_mask = selected[word]
    u = rng.random(n)
    to_mask = loss_mask & (u < mask_rate)
    to_random = loss_mask & ~to_mask & (u < mask_rate + random_rate)
    excluded = np.union1d(np.asarray(special_ids, np.int64), [mask_id])
    random_ids = _uniform_excluding(rng, vocab_size, excluded, n)
    inputs = np.where(to_mask, mask_id, np.where(to_random, random_ids, tokens))
    return inputs.astype(np.int32), tokens.astype(np.int32), loss_mask


def _uniform_excluding(rng: np.random.Generator, high: int, excluded: np.ndarray, size: int) -> IntArray:
    """``size`` ids uniform over ``[0, high)`` minus ``excluded``."""
    excluded = np.unique(excluded[(excluded >= 0) & (excluded < high)])
    if high - len(excluded) <= 0:
        raise DataError(
            f"mlm vocab_size: all {high} ids are special, none is left for random replacement: "
            "pass the model's vocabulary size"
        )
    x = rng.integers(0, high - len(excluded), size)
    for e in excluded:  # ascending: the r-th allowed id is r shifted past each excluded id <= it
        x += x >= e
    return x


# ---------------------------------------------------------------------------------------------
# BART denoising


def text_infilling(
    tokens: IntArray,
    *,
    rng: np.random.Generator,
    mask_id: int,
    mask_ratio: float = 0.3,
    poisson_lambda: float = 3.0,
    segment_ids: IntArray | None = None,
) -> tuple[IntArray, IntArray]:
    """BART's text infilling: ``(noisy, noisy_segment_ids)``; the target is ``tokens`` itself.

    Span lengths are drawn from Poisson(``poisson_lambda``) until they cover
    ``ceil(mask_ratio * len)`` tokens (the last one trimmed to fit, as fairseq does). Each span
    becomes one ``mask_id``; a length-0 span inserts one. Spans sit at distinct random gaps
    between kept tokens, so no two masks are adjacent and every masked token is in exactly one
    span. (Where there are more spans than gaps, only in tiny sequences, the surplus spans join
    the last placed one.) Segment ids follow the module's rule (a mask at the very end takes
    the last token's).
    """
    tokens = np.asarray(tokens)
    seg = _segments(tokens, segment_ids)
    if not 0 <= mask_ratio <= 1:
        raise DataError(f"objective.mask_ratio: {mask_ratio} is outside [0, 1]: pass e.g. 0.3")
    if not poisson_lambda > 0:
        raise DataError(f"objective.poisson_lambda: {poisson_lambda} is not positive: pass e.g. 3.0")
    n_masked = math.ceil(len(tokens) * mask_ratio)
    if n_masked == 0:
        return tokens.astype(np.int32), seg
    lengths = np.zeros(0, np.int64)
    while lengths.sum() < n_masked:
        lengths = np.concatenate([lengths, rng.poisson(poisson_lambda, int(n_masked / poisson_lambda) + 8)])
    last = int(np.searchsorted(np.cumsum(lengths), n_masked))  # first span that reaches the budget
    lengths = lengths[: last + 1]
    lengths[-1] = n_masked - lengths[:-1].sum()
    n_kept = len(tokens) - n_masked
    n_gaps = n_kept + 1  # before each kept token, and at the end
    if len(lengths) > n_gaps:
        lengths[n_gaps - 1] += lengths[n_gaps:].sum()
        lengths = lengths[:n_gaps]
    gap_length = np.zeros(n_gaps, np.int64)
    has_span = np.zeros(n_gaps, bool)
    gaps = rng.choice(n_gaps, len(lengths), replace=False)
    gap_length[gaps], has_span[gaps] = lengths, True
    # raw index where gap g's span starts (the kept tokens and spans before it)
    span_start = np.cumsum(gap_length) - gap_length + np.arange(n_gaps)
    kept_index = span_start[:-1] + gap_length[:-1]
    is_kept = np.arange(n_gaps) < n_kept
    noisy = _interleave(np.int64(mask_id), has_span, np.append(tokens[kept_index], 0), is_kept)
    span_seg = seg[np.minimum(span_start, len(tokens) - 1)]
    noisy_seg = _interleave(span_seg, has_span, np.append(seg[kept_index], 0), is_kept)
    return noisy, noisy_seg


def sentence_permutation(
    tokens: IntArray, *, rng: np.random.Generator, sentence_end_ids: Sequence[int],
    segment_ids: IntArray | None = None,
) -> tuple[IntArray, IntArray]:
    """BART's sentence permutation: ``(permuted, permuted_segment_ids)``; the target is
    ``tokens`` itself.

    A sentence ends after each id in ``sentence_end_ids`` and at each document end (a
    trailing piece without one is a sentence too); the sentences are shuffled and
    concatenated. Every token keeps its segment id, so each document's sentences, read in
    its own segment, are a uniform permutation of them (as if each were shuffled alone).
    """
    tokens = np.asarray(tokens)
    seg = _segments(tokens, segment_ids)
    if not len(sentence_end_ids):
        raise DataError("objective.sentence_end_ids: empty: pass the ids of '.', '\\n' and the like")
    ends = np.flatnonzero(np.isin(tokens, np.asarray(sentence_end_ids, np.int64))) + 1
    ends = np.union1d(ends[ends < len(tokens)], np.flatnonzero(np.diff(seg)) + 1)
    order = rng.permutation(len(ends) + 1)

    def permute(x: IntArray) -> IntArray:
        pieces = np.split(x, ends)
        return np.concatenate([pieces[i] for i in order]).astype(np.int32)

    return permute(tokens), permute(seg)


# ---------------------------------------------------------------------------------------------
# UL2 mixture of denoisers


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser: ``kind`` "span" (span corruption at ``noise_density`` and
    ``mean_span_length``) or "prefix" (sequential: prefix in, continuation out); its mode
    token ``mode_token_id`` starts every input it makes."""

    name: str
    mode_token_id: int
    kind: str = "span"
    noise_density: float = 0.15
    mean_span_length: float = 3.0

    def __post_init__(self):
        if self.kind not in ("span", "prefix"):
            raise DataError(f"objective.denoisers: {self.name!r} has kind {self.kind!r}: pass 'span' or 'prefix'")
        if self.kind == "span":
            _check_span_args(self.noise_density, self.mean_span_length)


def default_ul2_denoisers(mode_ids: Mapping[str, int]) -> tuple[Denoiser, ...]:
    """UL2-paper-like denoisers: R (regular spans: density 0.15, mean 3), two X (extreme: density
    0.5 with mean 3, density 0.15 with mean 32) and S (prefix LM). ``mode_ids`` maps "R", "X"
    and "S" to their mode token ids."""
    missing = sorted({"R", "X", "S"} - set(mode_ids))
    if missing:
        raise DataError(f"objective.mode_ids: no id for {', '.join(missing)}: pass ids for R, X and S")
    return (
        Denoiser("R", mode_ids["R"], "span", 0.15, 3.0),
        Denoiser("X_dense", mode_ids["X"], "span", 0.5, 3.0),
        Denoiser("X_long", mode_ids["X"], "span", 0.15, 32.0),
        Denoiser("S", mode_ids["S"], "prefix"),
    )


def ul2_window_length(
    denoisers: Sequence[Denoiser], *, inputs_length: int, targets_length: int, with_eos: bool = True
) -> int:
    """How many raw tokens :func:`ul2_example` needs to fill its inputs whichever denoiser it
    picks: the longest raw length of the span denoisers and what S can use."""
    return max(
        span_corruption_lengths(inputs_length - 1, d.noise_density, d.mean_span_length, with_eos=with_eos)[0]
        if d.kind == "span" else sum(_prefix_budget(inputs_length, targets_length, with_eos))
        for d in denoisers
    )


def ul2_example(
    tokens: IntArray,
    *,
    denoisers: Sequence[Denoiser],
    rates: Sequence[float],
    rng: np.random.Generator,
    sentinel_ids: Sequence[int],
    inputs_length: int,
    targets_length: int,
    eos_id: int | None = None,
    pad_id: int = 0,
    segment_ids: IntArray | None = None,
) -> dict[str, np.ndarray | int]:
    """One UL2 example from ``tokens`` by a denoiser drawn with probabilities ``rates``
    (normalised): ``inputs`` int32 ``[inputs_length]`` (the mode token, then the corrupted
    tokens or the prefix), ``targets`` int32 ``[targets_length]``, their
    ``inputs_segment_ids`` and ``targets_segment_ids`` (int32, 0 on padding ``pad_id``; the
    module's rule, the mode token in the first token's segment) and ``mode`` (the
    denoiser's index).

    Span denoisers corrupt the first raw tokens that fill the inputs exactly
    (:func:`span_corruption_lengths` of ``inputs_length - 1``); targets longer than
    ``targets_length`` are cut. The prefix denoiser splits the first tokens, as many as inputs
    and targets hold, at a uniform point where prefix and continuation both fit, so neither is
    cut. With ``eos_id``, inputs and targets end with it (before any padding).
    """
    tokens = np.asarray(tokens)
    seg = _segments(tokens, segment_ids)
    rates = np.asarray(rates, np.float64)
    if len(rates) != len(denoisers) or not len(rates) or (rates < 0).any() or not rates.sum() > 0:
        raise DataError(
            f"objective.mixing_rates: {rates.tolist()} for {len(denoisers)} denoisers: pass one "
            "non-negative rate per denoiser, not all zero"
        )
    extra = int(eos_id is not None)
    if inputs_length < 2 + extra or targets_length < 1 + extra:
        raise DataError(
            f"data.seq_len: inputs of {inputs_length} and targets of {targets_length} tokens are too "
            "short for UL2: raise data.seq_len"
        )
    for d in denoisers:  # every denoiser, so a bad one fails on the first example, not by chance later
        if d.kind == "span":
            raw, _ = span_corruption_lengths(inputs_length - 1, d.noise_density, d.mean_span_length,
                                             with_eos=eos_id is not None)
            n_spans = _span_counts(raw, d.noise_density, d.mean_span_length)[1]
            if n_spans > len(sentinel_ids):
                raise DataError(
                    f"objective.num_sentinels: {len(sentinel_ids)} sentinel ids but denoiser {d.name!r} "
                    f"makes {n_spans} noise spans: raise objective.num_sentinels to at least {n_spans}"
                )
    mode = int(rng.choice(len(denoisers), p=rates / rates.sum()))
    d = denoisers[mode]
    if d.kind == "span":
        raw, _ = span_corruption_lengths(inputs_length - 1, d.noise_density, d.mean_span_length,
                                         with_eos=eos_id is not None)
        inputs, targets, inputs_seg, targets_seg = span_corruption(
            tokens[:raw], noise_density=d.noise_density, mean_span_length=d.mean_span_length,
            sentinel_ids=sentinel_ids, rng=rng, eos_id=eos_id, segment_ids=seg[:raw],
        )
    else:
        prefix_max, continuation_max = _prefix_budget(inputs_length, targets_length, eos_id is not None)
        n = min(len(tokens), prefix_max + continuation_max)
        if n < 2:
            raise DataError(f"data.seq_len: {len(tokens)} tokens cannot be split into prefix and continuation: "
                            "raise data.seq_len")
        split = int(rng.integers(max(1, n - continuation_max), min(n - 1, prefix_max) + 1))
        inputs, targets = _with_eos(tokens[:split], eos_id), _with_eos(tokens[split:n], eos_id)
        eos_at = lambda s: None if eos_id is None else _last_segment(s)  # noqa: E731
        inputs_seg = _with_eos(seg[:split], eos_at(seg[:split]))
        targets_seg = _with_eos(seg[split:n], eos_at(seg[split:n]))
    first_seg = seg[:1] if len(seg) else np.ones(1, np.int32)
    inputs = _fit(np.concatenate([[d.mode_token_id], inputs]), inputs_length, pad_id)
    inputs_seg = _fit(np.concatenate([first_seg, inputs_seg]), inputs_length, 0)
    return dict(inputs=inputs, targets=_fit(targets, targets_length, pad_id), inputs_segment_ids=inputs_seg,
                targets_segment_ids=_fit(targets_seg, targets_length, 0), mode=mode)


def _prefix_budget(inputs_length: int, targets_length: int, with_eos: bool) -> tuple[int, int]:
    """Most prefix and continuation tokens a prefix-LM example holds (after the mode token and EOS)."""
    return inputs_length - 1 - int(with_eos), targets_length - int(with_eos)


def _fit(x: IntArray, length: int, pad_id: int) -> IntArray:
    """``x`` cut or padded with ``pad_id`` to ``length``, int32."""
    x = x[:length]
    return np.pad(x, (0, length - len(x)), constant_values=pad_id).astype(np.int32)
