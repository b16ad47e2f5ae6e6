"""Token streams, splits, random training windows, eval windows and packed examples."""

import grain
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.data import pipeline
from lmstack.data.pipeline import (
    TokenStream,
    eval_batches,
    packed_examples_iterator,
    split_stream,
    tokenize_documents,
    train_iterator,
)
from lmstack.data.sources import DataError
from lmstack.data.tokenizers import ByteTokenizer, CharTokenizer


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSTACK_CACHE", str(tmp_path / "cache"))


def stream_of(doc_lengths, name=""):
    """Tokens 0, 1, 2, ... so a window's first token is its start offset."""
    lengths = np.asarray(doc_lengths)
    return TokenStream(np.arange(lengths.sum(), dtype=np.int32), np.cumsum(lengths) - lengths, name)


def reference_window(stream, start, length):
    """Segment ids and positions the slow, obvious way."""
    starts = set(stream.doc_starts.tolist())
    segment_ids, positions = [], []
    for i in range(start, start + length):
        new_doc = i in starts and i > start
        segment_ids.append(segment_ids[-1] + new_doc if segment_ids else 1)
        positions.append(0 if new_doc or i == start else positions[-1] + 1)
    return segment_ids, positions


def check_window(stream, row):
    start = int(row["tokens"][0])
    length = len(row["tokens"])
    np.testing.assert_array_equal(row["tokens"], stream.tokens[start : start + length])
    segment_ids, positions = reference_window(stream, start, length)
    np.testing.assert_array_equal(row["segment_ids"], segment_ids)
    np.testing.assert_array_equal(row["positions"], positions)


def test_tokenize_documents_adds_bos_eos():
    tok = ByteTokenizer()
    stream = tokenize_documents(["ab", "", "c"], tok, cache=False)
    np.testing.assert_array_equal(stream.tokens, [257, 97, 98, 258, 257, 258, 257, 99, 258])
    np.testing.assert_array_equal(stream.doc_starts, [0, 4, 6])
    assert stream.tokens.dtype == np.int32


def test_tokenize_documents_without_specials_skips_empty_documents():
    tok = CharTokenizer.from_documents(["abc"])
    stream = tokenize_documents(["ab", "", "c", "ca"], tok, cache=False)
    np.testing.assert_array_equal(stream.tokens, [0, 1, 2, 2, 0])
    np.testing.assert_array_equal(stream.doc_starts, [0, 2, 3])


def test_tokenize_documents_cache(tmp_path, monkeypatch):
    docs = ["hello", "world"]
    first = tokenize_documents(docs, ByteTokenizer())
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 1
    monkeypatch.setattr(pipeline, "_encode", lambda *a: pytest.fail("encoded again despite the cache"))
    second = tokenize_documents(docs, ByteTokenizer())
    np.testing.assert_array_equal(first.tokens, second.tokens)
    np.testing.assert_array_equal(first.doc_starts, second.doc_starts)
    # The key covers document boundaries and the tokenizer.
    with pytest.raises(pytest.fail.Exception):
        tokenize_documents(["hellow", "orld"], ByteTokenizer())
    with pytest.raises(pytest.fail.Exception):
        tokenize_documents(docs, CharTokenizer.from_documents(docs))


def test_split_sizes_and_the_cut_document():
    stream = stream_of([300, 500, 200])
    train, val = split_stream(stream, 0.25)
    assert (len(train), len(val), train.name, val.name) == (750, 250, "train", "val")
    np.testing.assert_array_equal(train.tokens, np.arange(750))
    np.testing.assert_array_equal(train.doc_starts, [0, 300])
    np.testing.assert_array_equal(val.tokens, np.arange(750, 1000))
    np.testing.assert_array_equal(val.doc_starts, [0, 50])  # the tail of document 2, then document 3
    train, val = split_stream(stream, 0.2)  # the cut falls on a document start
    np.testing.assert_array_equal(val.doc_starts, [0])
    train, val = split_stream(stream, 0.0)
    assert (len(train), len(val), len(val.doc_starts)) == (1000, 0, 0)


def test_split_errors():
    stream = stream_of([100])
    with pytest.raises(DataError, match=r"^data\.val_fraction: 1\.0 is outside \[0, 1\): pass e\.g\."):
        split_stream(stream, 1.0)
    with pytest.raises(DataError) as e:
        split_stream(stream, 0.1, seq_len=16)
    assert str(e.value) == (
        "data.seq_len: the val split has 10 tokens, fewer than one window of seq_len + 1 = 17: "
        "raise --config.data.val_fraction, lower --config.data.seq_len, or use more data"
    )
    too_long = r"^data\.seq_len: the train split has 50 tokens, .* = 65: lower --config"
    with pytest.raises(DataError, match=too_long):
        split_stream(stream, 0.5, seq_len=64)
    assert len(split_stream(stream, 0.0, seq_len=64)[0]) == 100  # no val split: nothing to check there


def test_train_windows_are_stream_slices_with_document_structure():
    stream = stream_of([5, 1, 40, 3, 3, 60, 2, 7])
    it = train_iterator(stream, seq_len=16, batch_size=8, seed=0)
    for _ in range(20):
        batch = next(it)
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
            k: ((8, 17), np.int32) for k in ("tokens", "segment_ids", "positions")
        }
        for i in range(8):
            check_window(stream, {k: v[i] for k, v in batch.items()})


@settings(max_examples=50, deadline=None)
@given(
    doc_lengths=st.lists(st.integers(1, 20), min_size=1, max_size=30),
    seq_len=st.integers(1, 24),
    seed=st.integers(0, 2**32),
)
def test_windows_match_reference(doc_lengths, seq_len, seed):
    stream = stream_of(doc_lengths)
    if len(stream) < seq_len + 1:
        return
    batch = next(train_iterator(stream, seq_len=seq_len, batch_size=4, seed=seed))
    for i in range(4):
        check_window(stream, {k: v[i] for k, v in batch.items()})


def test_window_starts_cover_the_whole_range_uniformly():
    stream = stream_of([20])
    it = train_iterator(stream, seq_len=15, batch_size=100, seed=3)
    starts = np.concatenate([next(it)["tokens"][:, 0] for _ in range(20)])
    counts = np.bincount(starts, minlength=5)
    assert len(counts) == 5  # starts lie in [0, len - seq_len - 1] = [0, 4]
    assert counts.min() > 340 and counts.max() < 460  # 400 each expected; > 5 sigma margin


def test_same_seed_same_batches_other_seed_other_batches():
    stream = stream_of([1000, 1000])

    def first_batches(seed):
        it = train_iterator(stream, seq_len=32, batch_size=4, seed=seed)
        return np.stack([next(it)["tokens"] for _ in range(5)])

    np.testing.assert_array_equal(first_batches(7), first_batches(7))
    assert not np.array_equal(first_batches(7), first_batches(8))


def test_iterator_state_round_trip():
    stream = stream_of([300, 200, 500])
    kwargs = dict(seq_len=32, batch_size=4, seed=1)
    uninterrupted = train_iterator(stream, **kwargs)
    expected = [next(uninterrupted)["tokens"] for _ in range(10)]
    it = train_iterator(stream, **kwargs)
    for _ in range(6):
        next(it)
    state = it.get_state()
    resumed = train_iterator(stream, **kwargs)
    resumed.set_state(state)
    for want in expected[6:]:
        np.testing.assert_array_equal(next(resumed)["tokens"], want)


def test_iterator_orbax_checkpoint_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    stream = stream_of([300, 200, 500])
    kwargs = dict(seq_len=32, batch_size=4, seed=2)
    uninterrupted = train_iterator(stream, **kwargs)
    expected = [next(uninterrupted) for _ in range(8)]
    it = train_iterator(stream, **kwargs)
    for _ in range(5):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
        resumed = train_iterator(stream, **kwargs)
        restored = mgr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    for want in expected[5:]:
        got = next(restored.data)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_train_iterator_errors():
    stream = stream_of([10], name="train")
    with pytest.raises(DataError) as e:
        train_iterator(stream, seq_len=10, batch_size=2, seed=0)
    assert str(e.value) == (
        "data.seq_len: the train split has 10 tokens, fewer than one window of seq_len + 1 = 11: "
        "lower --config.data.seq_len, lower --config.data.val_fraction, or use more data"
    )
    with pytest.raises(DataError, match=r"^train\.batch_size: 0 is not positive: pass a value >= 1$"):
        train_iterator(stream, seq_len=4, batch_size=0, seed=0)
    with pytest.raises(DataError, match=r"^data\.seq_len: -1 is not positive"):
        train_iterator(stream, seq_len=-1, batch_size=2, seed=0)
    with pytest.raises(DataError, match=r"^data\.seed: -1 is negative"):
        train_iterator(stream, seq_len=4, batch_size=2, seed=-1)


def test_eval_batches_cover_the_stream_once_with_padding():
    stream = stream_of([30, 3, 40], name="val")  # 73 tokens: 72 targets
    batches = eval_batches(stream, seq_len=8, batch_size=4)
    assert len(batches) == 3  # 9 windows of 8 targets, in batches of 4: the last has 3 padding rows
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert all(v.shape == (12, 9) for v in rows.values())
    for i in range(9):
        check_window(stream, {k: v[i] for k, v in rows.items()})
    np.testing.assert_array_equal(rows["tokens"][:, 0][:9], np.arange(0, 72, 8))
    # Targets (tokens[1:]) where the row is not padding: every token after the first, once.
    targets = rows["tokens"][:, 1:][rows["segment_ids"][:, 1:] > 0]
    np.testing.assert_array_equal(targets, np.arange(1, 73))
    assert not rows["segment_ids"][9:].any() and not rows["tokens"][9:].any()


def test_eval_batches_pads_the_last_window():
    stream = stream_of([7, 6], name="val")  # 13 tokens: windows at 0 and 8, the second holds 5 tokens
    (batch,) = eval_batches(stream, seq_len=8, batch_size=2)
    np.testing.assert_array_equal(batch["tokens"][1], [8, 9, 10, 11, 12, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["segment_ids"][1], [1, 1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["positions"][1], [0, 1, 2, 3, 4, 0, 0, 0, 0])


def test_eval_batches_max_batches_and_errors():
    stream = stream_of([1000], name="val")
    batches = eval_batches(stream, seq_len=10, batch_size=3, max_batches=2)
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[1]["tokens"][:, 0], [30, 40, 50])
    with pytest.raises(DataError, match=r"^eval\.batches: -1 is negative"):
        eval_batches(stream, seq_len=10, batch_size=3, max_batches=-1)
    with pytest.raises(DataError, match=r"^eval\.batch_size: 0 is not positive"):
        eval_batches(stream, seq_len=10, batch_size=0)
    empty = r"^data\.seq_len: the val split has 0 tokens.*raise --config\.data\.val_fraction"
    with pytest.raises(DataError, match=empty):
        eval_batches(stream_of([], name="val"), seq_len=10, batch_size=3)


def test_packed_examples_segments_match_the_examples():
    examples = [
        {"x": list(range(100 * i, 100 * i + n)), "y": [i] * (n % 3 + 1)}
        for i, n in enumerate([3, 5, 2, 9, 4, 1, 6, 7])
    ]
    lengths = {"x": 8, "y": 4}
    it = packed_examples_iterator(examples, feature_lengths=lengths, batch_size=2, seed=0, num_epochs=1)
    seen = []
    for batch in it:
        assert {k: v.shape for k, v in batch.items()} == {
            f + s: (2, lengths[f]) for f in lengths for s in ("", "_segment_ids", "_positions")
        }
        for row in range(2):
            seg_x, seg_y = batch["x_segment_ids"][row], batch["y_segment_ids"][row]
            for seg in range(1, seg_x.max() + 1):
                x = batch["x"][row][seg_x == seg]
                np.testing.assert_array_equal(batch["x_positions"][row][seg_x == seg], np.arange(len(x)))
                i = int(x[0]) // 100
                np.testing.assert_array_equal(x, examples[i]["x"][:8])  # truncated to its length
                np.testing.assert_array_equal(batch["y"][row][seg_y == seg], examples[i]["y"])
                seen.append(i)
            assert not batch["x"][row][seg_x == 0].any()  # padding is zeros
    # One epoch: every example once, except any left in the final partial batch.
    assert len(seen) == len(set(seen)) >= 6


def test_packed_examples_shuffle_by_seed():
    examples = [{"x": [i + 1]} for i in range(32)]

    def first(seed):
        it = packed_examples_iterator(examples, feature_lengths={"x": 4}, batch_size=2, seed=seed)
        return next(it)["x"]

    np.testing.assert_array_equal(first(0), first(0))
    assert not np.array_equal(first(0), first(1))


def _reverse_and_noise(window, rng):
    """A stand-in noising transform: output depends on the window and on the rng."""
    return {"inputs": window["tokens"][::-1].copy(), "noise": rng.integers(0, 1000, size=3),
            "segment_ids": window["segment_ids"], "positions": window["positions"]}


def test_transformed_windows_are_deterministic_and_resumable():
    stream = stream_of([40, 70, 30])
    make = lambda seed: pipeline.transformed_windows_iterator(  # noqa: E731
        stream, window_length=9, batch_size=4, seed=seed, transform=_reverse_and_noise)
    it = make(0)
    first = [next(it) for _ in range(3)]
    for b in first:
        assert b["inputs"].shape == (4, 9) and b["noise"].shape == (4, 3)
        for r, row in enumerate(b["inputs"][:, ::-1]):  # every row is a slice of the stream...
            starts = [s for s in range(len(stream) - 8) if np.array_equal(stream.tokens[s:s + 9], row)]
            assert starts
            # ...and the transform saw its documents
            check_window(stream, {"tokens": row, "segment_ids": b["segment_ids"][r], "positions": b["positions"][r]})
    state = it.get_state()
    later = next(it)
    again = make(0)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["noise"], later["noise"])
    other = next(make(1))
    assert not np.array_equal(other["noise"], first[0]["noise"])
    np.testing.assert_array_equal(next(make(0))["noise"], first[0]["noise"])


def test_transformed_eval_batches_are_consecutive_windows():
    stream = stream_of([50, 50])
    batches = pipeline.transformed_eval_batches(stream, window_length=10, batch_size=3, max_batches=0, seed=0,
                                                transform=_reverse_and_noise)
    assert len(batches) == 3  # 10 windows -> 3 whole batches of 3
    rows = np.concatenate([b["inputs"][:, ::-1] for b in batches])
    np.testing.assert_array_equal(rows, stream.tokens[:90].reshape(9, 10))
    for r, row in enumerate(rows):
        b, i = batches[r // 3], r % 3
        check_window(stream, {"tokens": row, "segment_ids": b["segment_ids"][i], "positions": b["positions"][i]})
    again = pipeline.transformed_eval_batches(stream, window_length=10, batch_size=3, max_batches=2, seed=0,
                                              transform=_reverse_and_noise)
    assert len(again) == 2
    np.testing.assert_array_equal(again[1]["noise"], batches[1]["noise"])


def test_segment_positions_count_each_segments_tokens_in_order():
    seg = np.array([1, 1, 2, 1, 2, 2, 3, 0, 0])
    np.testing.assert_array_equal(pipeline.segment_positions(seg), [0, 1, 0, 2, 1, 2, 0, 0, 1])
    stream = stream_of([5, 9, 3, 20])  # contiguous documents: the windows' own positions
    window = stream.windows(np.array([2]), 16)
    np.testing.assert_array_equal(pipeline.segment_positions(window["segment_ids"][0]), window["positions"][0])
