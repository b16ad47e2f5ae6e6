"""Noising functions: T5 span corruption, BERT masking, BART infilling and permutation, UL2."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.data.noise import (
    Denoiser,
    default_ul2_denoisers,
    mlm_mask,
    random_spans_noise_mask,
    reassemble,
    sentence_permutation,
    span_corruption,
    span_corruption_lengths,
    text_infilling,
    top_of_vocab_ids,
    ul2_example,
    ul2_window_length,
)
from lmstack.data.sources import DataError

VOCAB = 1000
SENTINELS = top_of_vocab_ids(VOCAB, 400)  # 999, 998, ...; tokens below stay under 600
EOS = 1


def spans_of(mask_bn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(number of noise spans, number of noise tokens) per row, read off the mask itself."""
    prev = np.pad(mask_bn[:, :-1], ((0, 0), (1, 0)))
    return (mask_bn & ~prev).sum(1), mask_bn.sum(1)


def message(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --- T5 span corruption -------------------------------------------------------------------------


@pytest.mark.parametrize("density, mean_span", [(0.15, 3.0), (0.5, 8.0)])
def test_noise_mask_statistics(density, mean_span):
    rng = np.random.default_rng(0)
    masks = np.stack([random_spans_noise_mask(512, density, mean_span, rng) for _ in range(2000)])
    n_spans, n_noise = spans_of(masks)
    assert abs(masks.mean() - density) <= 0.005
    assert abs(n_noise.sum() / n_spans.sum() - mean_span) <= 0.1
    # T5's shape: non-noise first, noise last; otherwise noise falls evenly along the sequence.
    assert not masks[:, 0].any() and masks[:, -1].all()
    halves = masks[:, 1:257].mean(), masks[:, 256:-1].mean()
    assert abs(halves[0] - halves[1]) < 0.01
    # Span lengths vary (a random segmentation), they are not all the mean.
    starts = np.flatnonzero(np.diff(masks[:50].ravel().astype(int)) == 1)
    ends = np.flatnonzero(np.diff(masks[:50].ravel().astype(int)) == -1)
    assert len(set((ends - starts[: len(ends)]).tolist())) > 3


def test_span_corruption_lengths_match_t5():
    # T5's random_spans_helper: inputs 512 at density 0.15 and mean span 3 -> 568 raw, 114 targets.
    assert span_corruption_lengths(512, 0.15, 3.0) == (568, 114)
    raw, targets = span_corruption_lengths(512, 0.15, 3.0, with_eos=False)
    assert (raw, targets) == (569, 113)


@settings(max_examples=150, deadline=None)
@given(
    length=st.integers(2, 300),
    density=st.floats(0.01, 0.99),
    mean_span=st.floats(1.0, 20.0),
    with_eos=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_reassemble_inverts_span_corruption(length, density, mean_span, with_eos, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 600, length)  # may hold EOS inside: only the final one is added
    eos = EOS if with_eos else None
    kwargs = dict(noise_density=density, mean_span_length=mean_span, sentinel_ids=SENTINELS, rng=rng, eos_id=eos)
    if mean_span > length:
        assert "objective.mean_span_length" in message(span_corruption, tokens, **kwargs)
        return
    inputs, targets, _, _ = span_corruption(tokens, **kwargs)
    np.testing.assert_array_equal(reassemble(inputs, targets, SENTINELS, eos), tokens)
    # Sentinels are used in order from the top, once each on both sides.
    used = inputs[inputs >= 600]
    np.testing.assert_array_equal(used, SENTINELS[: len(used)])
    np.testing.assert_array_equal(targets[targets >= 600], used)
    assert inputs.dtype == targets.dtype == np.int32


@settings(max_examples=100, deadline=None)
@given(
    inputs_length=st.integers(4, 600),
    density=st.floats(0.01, 0.9),
    mean_span=st.floats(1.0, 10.0),
    with_eos=st.booleans(),
)
def test_output_lengths_are_exact(inputs_length, density, mean_span, with_eos):
    try:
        raw, targets_length = span_corruption_lengths(inputs_length, density, mean_span, with_eos=with_eos)
    except DataError as e:  # no raw length fits exactly: only where the message says why
        assert str(e).split(":")[0] in {"objective.noise_density", "objective.mean_span_length", "data.seq_len"}
        return
    for seed in range(8):
        inputs, targets, _, _ = span_corruption(
            np.arange(raw) % 600, noise_density=density, mean_span_length=mean_span, sentinel_ids=SENTINELS,
            rng=np.random.default_rng(seed), eos_id=EOS if with_eos else None,
        )
        assert (len(inputs), len(targets)) == (inputs_length, targets_length)


def test_span_corruption_is_deterministic_by_seed():
    tokens = np.arange(200)
    run = lambda seed: span_corruption(  # noqa: E731
        tokens, noise_density=0.15, mean_span_length=3.0, sentinel_ids=SENTINELS, rng=np.random.default_rng(seed))
    np.testing.assert_array_equal(run(3)[0], run(3)[0])
    assert not np.array_equal(run(3)[0], run(4)[0])


# --- BERT masked LM -----------------------------------------------------------------------------

MLM_VOCAB, MASK, SPECIALS = 30000, 4, (0, 1, 2, 3)


def mlm_corpus(rng, rows=400, length=512):
    tokens = rng.integers(5, MLM_VOCAB, (rows, length))
    return np.where(rng.random((rows, length)) < 0.05, rng.choice(SPECIALS, (rows, length)), tokens)


def test_mlm_proportions():
    rng = np.random.default_rng(0)
    tokens = mlm_corpus(rng)
    out = [mlm_mask(t, rng=rng, mask_id=MASK, vocab_size=MLM_VOCAB, special_ids=SPECIALS) for t in tokens]
    inputs, targets, loss = (np.stack(x) for x in zip(*out))
    special = np.isin(tokens, SPECIALS)
    np.testing.assert_array_equal(targets, tokens)
    assert not loss[special].any() and (inputs[special] == tokens[special]).all()
    assert abs(loss.sum() / (~special).sum() - 0.15) <= 0.005
    np.testing.assert_array_equal(inputs[~loss], tokens[~loss])  # unselected tokens untouched
    masked = (inputs == MASK)[loss].mean()
    replaced = ((inputs != MASK) & (inputs != tokens))[loss].mean()
    kept = (inputs == tokens)[loss].mean()
    assert abs(masked - 0.8) <= 0.01 and abs(replaced - 0.1) <= 0.01 and abs(kept - 0.1) <= 0.01


def test_mlm_random_ids_are_uniform_over_non_special_ids():
    rng = np.random.default_rng(1)
    tokens = rng.choice([1, 2, 5, 6, 7, 8], 20000)
    inputs, _, loss = mlm_mask(tokens, rng=rng, mask_id=4, vocab_size=10, special_ids=(0, 3, 9),
                               select_rate=1.0, mask_rate=0.0, random_rate=1.0)
    assert loss.all()
    counts = np.bincount(inputs, minlength=10)
    assert counts[[0, 3, 4, 9]].sum() == 0  # specials and the mask id are never drawn
    allowed = counts[[1, 2, 5, 6, 7, 8]]
    assert np.abs(allowed / allowed.mean() - 1).max() < 0.1


def test_mlm_whole_words():
    rng = np.random.default_rng(2)
    tokens = mlm_corpus(rng, rows=200)
    special = np.isin(tokens, SPECIALS)
    # As a tokenizer marks them: a special token is a word, and the token after it starts one.
    word_starts = (rng.random(tokens.shape) < 0.4) | special | np.pad(special[:, :-1], ((0, 0), (1, 0)))
    selected = 0
    for t, ws, sp in zip(tokens, word_starts, special):
        _, _, loss = mlm_mask(t, rng=rng, mask_id=MASK, vocab_size=MLM_VOCAB, word_starts=ws, special_ids=SPECIALS)
        assert not loss[sp].any()
        word = np.cumsum(ws | (np.arange(len(t)) == 0))
        for w in np.unique(word):  # a word's non-special tokens are all selected or none is
            in_word = (word == w) & ~sp
            assert loss[in_word].all() or not loss[in_word].any()
        selected += loss.sum()
    assert abs(selected / (~special).sum() - 0.15) <= 0.01


# --- BART denoising -----------------------------------------------------------------------------


def infill_spans(inputs: np.ndarray, n: int, mask_id: int) -> list[int]:
    """Span lengths behind each mask, for inputs infilled from tokens ``10 + arange(n)``."""
    lengths, prev = [], -1
    for i, tok in enumerate(inputs):
        if tok == mask_id:
            nxt = inputs[i + 1] - 10 if i + 1 < len(inputs) else n
            lengths.append(int(nxt - prev - 1))
        else:
            prev = tok - 10
    return lengths


def test_text_infilling_masks_poisson_spans():
    n, rng, lengths = 512, np.random.default_rng(0), []
    tokens = 10 + np.arange(n)
    for _ in range(500):
        inputs, _ = text_infilling(tokens, rng=rng, mask_id=5, mask_ratio=0.3, poisson_lambda=3.0)
        is_mask = inputs == 5
        assert not (is_mask[1:] & is_mask[:-1]).any()  # one mask per span, never two in a row
        kept = inputs[~is_mask]
        assert (np.diff(kept) > 0).all()  # kept tokens in order
        spans = infill_spans(inputs, n, 5)
        assert sum(spans) == n - len(kept) == math.ceil(0.3 * n)
        lengths += spans
    lengths = np.array(lengths)
    # Poisson(3) but for the one span per example trimmed to the budget (about 1 in 50).
    assert abs(lengths.mean() - 3.0) < 0.1
    pmf = np.array([math.exp(-3) * 3**k / math.factorial(k) for k in range(8)])
    np.testing.assert_allclose(np.bincount(lengths, minlength=8)[:8] / len(lengths), pmf, atol=0.01)


def test_text_infilling_edge_cases():
    rng = np.random.default_rng(0)
    tokens = np.arange(10, 20)
    np.testing.assert_array_equal(text_infilling(tokens, rng=rng, mask_id=5, mask_ratio=0.0)[0], tokens)
    np.testing.assert_array_equal(text_infilling(tokens, rng=rng, mask_id=5, mask_ratio=1.0)[0], [5])
    for seed in range(50):  # tiny sequences: the budget still holds
        out, _ = text_infilling(tokens[:3], rng=np.random.default_rng(seed), mask_id=5, mask_ratio=0.9,
                                poisson_lambda=0.5)
        assert sum(infill_spans(out, 3, 5)) == 3 and (out == 5).sum() == 1


def test_sentence_permutation_keeps_sentences():
    rng = np.random.default_rng(0)
    ends = (7, 8)
    moved = 0
    for _ in range(200):
        tokens = rng.integers(7, 20, 60)
        out, _ = sentence_permutation(tokens, rng=rng, sentence_end_ids=ends)
        assert sorted(out.tolist()) == sorted(tokens.tolist())

        def sentences(x):
            cut = np.flatnonzero(np.isin(x, ends)) + 1
            return np.split(x, cut[cut < len(x)])

        original = sentences(tokens)
        if tokens[-1] in ends:  # every piece is whole, so re-splitting finds the same sentences
            assert sorted(map(tuple, sentences(out))) == sorted(map(tuple, original))
        moved += not np.array_equal(out, tokens)
    assert moved > 150


# --- UL2 ----------------------------------------------------------------------------------------

MODES = {"R": 900, "X": 901, "S": 902}


def test_ul2_mixture_follows_rates_and_lengths_are_fixed():
    denoisers = default_ul2_denoisers(MODES)
    rates = (0.5, 0.2, 0.2, 0.1)
    in_len, tgt_len = 128, 100
    window = ul2_window_length(denoisers, inputs_length=in_len, targets_length=tgt_len)
    rng = np.random.default_rng(0)
    tokens = 10 + np.arange(window)
    counts = np.zeros(4)
    for _ in range(4000):
        ex = ul2_example(tokens, denoisers=denoisers, rates=rates, rng=rng, sentinel_ids=SENTINELS[:100],
                         inputs_length=in_len, targets_length=tgt_len, eos_id=EOS)
        d = denoisers[ex["mode"]]
        counts[ex["mode"]] += 1
        assert ex["inputs"].shape == (in_len,) and ex["targets"].shape == (tgt_len,)
        assert ex["inputs"][0] == d.mode_token_id
        inputs_mask, targets_mask = ex["inputs_segment_ids"] > 0, ex["targets_segment_ids"] > 0
        assert set(ex["inputs_segment_ids"]) <= {0, 1} and set(ex["targets_segment_ids"]) <= {0, 1}
        inputs, targets = ex["inputs"][inputs_mask], ex["targets"][targets_mask]
        assert (ex["inputs"][~inputs_mask] == 0).all() and (ex["targets"][~targets_mask] == 0).all()
        if d.kind == "span":
            assert inputs_mask.all()  # the window fills the inputs exactly
            raw, full_targets = span_corruption_lengths(in_len - 1, d.noise_density, d.mean_span_length)
            if full_targets <= tgt_len:
                np.testing.assert_array_equal(reassemble(inputs[1:], targets, SENTINELS, EOS), tokens[:raw])
        else:  # prefix, then continuation, contiguous
            assert inputs[-1] == targets[-1] == EOS
            joined = np.concatenate([inputs[1:-1], targets[:-1]])
            np.testing.assert_array_equal(joined, tokens[: len(joined)])
    expected = 4000 * np.array(rates)
    assert ((counts - expected) ** 2 / expected).sum() < 16.27  # chi-square, 3 dof, p = 0.001


def test_ul2_prefix_split_points_vary():
    s = Denoiser("S", 902, "prefix")
    rng = np.random.default_rng(0)
    splits = {int((ul2_example(np.arange(10, 60), denoisers=[s], rates=[1], rng=rng, sentinel_ids=(), inputs_length=40,
                               targets_length=30)["inputs_segment_ids"] > 0).sum()) for _ in range(300)}
    # 50 tokens, prefix at most 39, continuation at most 30: prefixes of 20..39 tokens (+ the mode token).
    assert splits == set(range(21, 41))


# --- documents in a window ---------------------------------------------------------------------


def window_segments(rng, n):
    """Segment ids 1, 2, ... of 1-5 documents of random lengths filling ``n`` tokens."""
    cuts = np.sort(rng.choice(np.arange(1, n), size=rng.integers(0, 5), replace=False))
    return np.repeat(np.arange(1, len(cuts) + 2), np.diff(np.concatenate([[0], cuts, [n]]))).astype(np.int32)


@pytest.mark.parametrize("seed", range(30))
def test_span_corruption_carries_segments(seed):
    """Each output token has the segment of the raw token it stands for; a sentinel that of its
    span's first token (the token after it in the targets); EOS that of the last token."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 80))
    tokens, seg = np.arange(n), window_segments(rng, n)  # token value = raw index
    inputs, targets, in_seg, tgt_seg = span_corruption(tokens, noise_density=0.3, mean_span_length=3.0,
                                                       sentinel_ids=SENTINELS, rng=rng, eos_id=EOS + 600,
                                                       segment_ids=seg)
    assert len(in_seg) == len(inputs) and len(tgt_seg) == len(targets)
    first_of_span = {int(targets[i]): int(targets[i + 1]) for i in range(len(targets) - 1) if targets[i] >= 900}
    for x, x_seg in ((inputs, in_seg), (targets, tgt_seg)):
        expected = [seg[t] if t < n else seg[first_of_span[t]] if t >= 900 else seg[-1] for t in x.tolist()]
        np.testing.assert_array_equal(x_seg, expected)


@pytest.mark.parametrize("seed", range(30))
def test_text_infilling_carries_segments(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    tokens, seg = 10 + np.arange(n), window_segments(rng, n)
    noisy, noisy_seg = text_infilling(tokens, rng=rng, mask_id=5, mask_ratio=0.3, segment_ids=seg)
    previous_kept = -1
    for t, s_ in zip(noisy.tolist(), noisy_seg.tolist()):
        if t == 5:  # a mask: the segment of the first token of its span (the token after the last kept one)
            assert s_ == seg[min(previous_kept + 1, n - 1)]
        else:
            previous_kept = t - 10
            assert s_ == seg[previous_kept]


@pytest.mark.parametrize("seed", range(30))
def test_sentence_permutation_shuffles_whole_sentences_of_each_document(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    seg = window_segments(rng, n)
    tokens = np.where(rng.random(n) < 0.15, 7, 10 + np.arange(n))  # 7 ends a sentence
    out, out_seg = sentence_permutation(tokens, rng=rng, sentence_end_ids=(7,), segment_ids=seg)
    cut = np.union1d(np.flatnonzero(tokens == 7) + 1, np.flatnonzero(np.diff(seg)) + 1)
    pieces = [(tuple(t), tuple(s_)) for t, s_ in zip(np.split(tokens, cut[cut < n]), np.split(seg, cut[cut < n]))]
    left, i = list(pieces), 0  # the output is the pieces (sentences cut at document ends too), each whole
    while i < n:
        match = [p for p in left if tuple(out[i:i + len(p[0])]) == p[0] and tuple(out_seg[i:i + len(p[0])]) == p[1]]
        assert match, (i, out, pieces)
        left.remove(match[0])
        i += len(match[0][0])
    assert not left


def test_ul2_prefix_denoiser_carries_segments():
    s = Denoiser("S", 902, "prefix")
    seg = np.repeat([1, 2, 3], [20, 15, 15]).astype(np.int32)
    ex = ul2_example(np.arange(10, 60), denoisers=[s], rates=[1], rng=np.random.default_rng(0), sentinel_ids=(),
                     inputs_length=40, targets_length=30, eos_id=EOS, segment_ids=seg)
    n_in = int((ex["inputs_segment_ids"] > 0).sum())  # mode token, prefix, EOS
    split = n_in - 2
    np.testing.assert_array_equal(ex["inputs_segment_ids"][:n_in], [1, *seg[:split], seg[split - 1]])
    n_tgt = 50 - split + 1
    np.testing.assert_array_equal(ex["targets_segment_ids"][:n_tgt], [*seg[split:], 3])
    assert not ex["inputs_segment_ids"][n_in:].any() and not ex["targets_segment_ids"][n_tgt:].any()


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.0, 1.0, 1.5, -0.1, float("nan")])
def test_noise_density_outside_unit_interval(density):
    for fn, args in [(random_spans_noise_mask, (100, density, 3.0, np.random.default_rng(0))),
                     (span_corruption_lengths, (100, density, 3.0))]:
        msg = message(fn, *args)
        assert msg.startswith("objective.noise_density:") and "outside (0, 1)" in msg
        assert "--config.objective.noise_density=" in msg


def test_mean_span_longer_than_sequence():
    msg = message(random_spans_noise_mask, 20, 0.15, 32.0, np.random.default_rng(0))
    assert msg.startswith("objective.mean_span_length:") and "longer than the 20-token sequence" in msg
    assert "lower objective.mean_span_length or raise data.seq_len" in msg
    msg = message(span_corruption_lengths, 20, 0.15, 32.0)
    assert msg.startswith("objective.mean_span_length:") and "raise data.seq_len" in msg
    assert message(random_spans_noise_mask, 20, 0.15, 0.5, None).startswith("objective.mean_span_length:")


def test_too_few_sentinels():
    msg = message(span_corruption, np.arange(512), noise_density=0.15, mean_span_length=3.0,
                  sentinel_ids=SENTINELS[:10], rng=np.random.default_rng(0))
    assert msg.startswith("objective.num_sentinels: 10 sentinel ids for 26 noise spans")
    assert "raise objective.num_sentinels to at least 26" in msg
    msg = message(ul2_example, np.arange(1000), denoisers=default_ul2_denoisers(MODES), rates=[1, 0, 0, 0],
                  rng=np.random.default_rng(0), sentinel_ids=SENTINELS[:100], inputs_length=512, targets_length=512)
    assert msg.startswith("objective.num_sentinels:") and "'X_dense'" in msg and "at least 128" in msg
    assert message(top_of_vocab_ids, 10, 11).startswith("objective.num_sentinels:")


def test_other_bad_settings():
    msg = message(span_corruption_lengths, 64, 0.9, 1.0)
    assert msg.startswith("objective.noise_density:") and "more noise spans than non-noise tokens" in msg
    assert message(span_corruption_lengths, 2, 0.15, 1.0).startswith("data.seq_len:")
    rng, t = np.random.default_rng(0), np.arange(10, 50)
    assert message(mlm_mask, t, rng=rng, mask_id=4, vocab_size=100, select_rate=0).startswith("objective.select_rate:")
    assert message(mlm_mask, t, rng=rng, mask_id=4, vocab_size=100, mask_rate=0.95).startswith("objective.mask_rate:")
    assert "one flag per token" in message(mlm_mask, t, rng=rng, mask_id=4, vocab_size=100, word_starts=[True])
    assert message(text_infilling, t, rng=rng, mask_id=4, mask_ratio=1.2).startswith("objective.mask_ratio:")
    assert message(text_infilling, t, rng=rng, mask_id=4, poisson_lambda=0).startswith("objective.poisson_lambda:")
    assert message(sentence_permutation, t, rng=rng, sentence_end_ids=()).startswith("objective.sentence_end_ids:")
    assert message(Denoiser, "Q", 5, "causal").startswith("objective.denoisers: 'Q' has kind 'causal'")
    assert message(Denoiser, "X", 5, "span", 1.5).startswith("objective.noise_density:")
    assert "no id for S, X" in message(default_ul2_denoisers, {"R": 1})
    ul2 = dict(denoisers=default_ul2_denoisers(MODES), rng=rng, sentinel_ids=SENTINELS, inputs_length=64,
               targets_length=64)
    for rates in ([1, 1], [1, -1, 1, 1], [0, 0, 0, 0]):
        assert message(ul2_example, t, rates=rates, **ul2).startswith("objective.mixing_rates:")
    assert message(reassemble, [5, 999], [999, 6], SENTINELS, eos_id=EOS).startswith("reassemble:")
    assert "one segment id per token" in message(text_infilling, t, rng=rng, mask_id=4, segment_ids=[1, 1])

