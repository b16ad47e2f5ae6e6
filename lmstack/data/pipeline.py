"""From documents to batches: one token stream, windows over it, and packed examples.

Causal LM pre-training reads fixed-length windows of ``seq_len + 1`` tokens (inputs are
``[:-1]``, targets ``[1:]``) from all documents concatenated, as nanoGPT and GPT-2 do. Each
window also carries ``segment_ids`` (1, 2, ... per document inside the window; 0 is padding)
and ``positions``, so attention and the loss never cross a document boundary: a target
``t`` belongs to the same document as its input only where
``segment_ids[t] == segment_ids[t - 1]``.

Positions count from 0 at the window start and restart at 0 wherever a document starts
inside the window, so they never reach ``seq_len + 1`` and a learned position table of
``seq_len`` rows always suffices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Callable, Mapping, Sequence

import grain
import numpy as np

from lmstack.data.sources import DataError
from lmstack.data.tokenizers import Tokenizer, cache_dir, with_bos

Batch = dict[str, np.ndarray]
_STREAM_FORMAT_VERSION = 1
# Windows are cut from memory in microseconds; reader threads would only contend for the GIL.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """All documents' tokens back to back, and where each document starts.

    ``doc_starts`` is sorted, starts with 0 (unless the stream is empty) and holds no
    duplicates: empty documents leave no trace.
    """

    tokens: np.ndarray  # int32 [n_tokens]
    doc_starts: np.ndarray  # int64 [n_docs]
    name: str = ""  # which split ("train", "val"), for error messages

    def __len__(self) -> int:
        return len(self.tokens)

    def windows(self, starts: np.ndarray, length: int) -> Batch:
        """Windows ``tokens[s : s + length]`` for each start, with segment ids and positions."""
        index = np.asarray(starts, np.int64)[:, None] + np.arange(length)
        doc = np.searchsorted(self.doc_starts, index, side="right") - 1
        segment_ids = doc - doc[:, :1] + 1
        # Where the token's document begins, clipped to the window start.
        segment_start = np.maximum(self.doc_starts[doc], index[:, :1])
        return {
            "tokens": self.tokens[index],
            "segment_ids": segment_ids.astype(np.int32),
            "positions": (index - segment_start).astype(np.int32),
        }


def examples_stream(examples: Sequence[Mapping[str, np.ndarray]], name: str = "") -> TokenStream:
    """The ``tokens`` of each example back to back, one document per example, or per sequence
    of an example holding several (``chosen_tokens`` and ``rejected_tokens`` of a preference
    pair: every ``*_tokens`` field in order): what a run hashes, counts and samples from when
    its objective reads examples, not windows."""
    pieces = [np.asarray(e[k], np.int32) for e in examples for k in e if k == "tokens" or k.endswith("_tokens")]
    lengths = np.array([len(p) for p in pieces], np.int64)
    starts = np.cumsum(lengths) - lengths
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    return TokenStream(tokens, starts[lengths > 0], name)


def tokenize_documents(
    documents: Sequence[str], tokenizer: Tokenizer, *, cache: bool = True
) -> TokenStream:
    """Encode each document as ``[bos] + ids + [eos]`` and concatenate: bos where the tokenizer's
    ``add_bos`` says documents start with one, eos wherever the tokenizer has one.

    With ``cache``, the result is stored under ``$LMSTACK_CACHE/tokens/<hash>/`` keyed by the
    documents and the tokenizer, and later calls load it instead of encoding again.
    """
    if not cache:
        return _encode(documents, tokenizer)
    path = cache_dir() / "tokens" / _stream_key(documents, tokenizer)
    if (path / "tokens.npy").is_file():
        return TokenStream(np.load(path / "tokens.npy"), np.load(path / "doc_starts.npy"))
    stream = _encode(documents, tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
    np.save(tmp / "tokens.npy", stream.tokens)
    np.save(tmp / "doc_starts.npy", stream.doc_starts)
    try:
        os.replace(tmp, path)
    except OSError:  # another process cached the same stream first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return stream


def split_stream(
    stream: TokenStream, val_fraction: float, *, seq_len: int | None = None
) -> tuple[TokenStream, TokenStream]:
    """(train, val): the last ``val_fraction`` of the tokens is validation.

    A document crossing the cut is cut in two. With ``seq_len``, both sides (val only if
    ``val_fraction > 0``) must hold at least one window.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(
            f"data.val_fraction: {val_fraction} is outside [0, 1): pass e.g. --config.data.val_fraction=0.1"
        )
    cut = int(len(stream) * (1 - val_fraction))  # as nanoGPT: train = data[:int(n * 0.9)]
    starts = stream.doc_starts
    train = TokenStream(stream.tokens[:cut], starts[starts < cut], "train")
    val_starts = starts[starts > cut] - cut
    if cut < len(stream):
        val_starts = np.concatenate([[0], val_starts])
    val = TokenStream(stream.tokens[cut:], val_starts.astype(np.int64), "val")
    if seq_len is not None:
        _check_stream(train, seq_len)
        if val_fraction > 0:
            _check_stream(val, seq_len)
    return train, val


def train_iterator(
    stream: TokenStream, *, seq_len: int, batch_size: int, seed: int, rows: slice | None = None
) -> grain.DatasetIterator:
    """An endless grain iterator of random windows: dicts of int32 ``(batch_size, seq_len + 1)``.

    Keys: ``tokens``, ``segment_ids``, ``positions``. Window ``g`` (counting over all
    batches) starts at a uniform offset in ``[0, len - seq_len - 1]`` that depends only on
    ``(seed, g)``, so the iterator's state is just the batch count and checkpoints with
    ``get_state``/``set_state`` or ``grain.checkpoint.CheckpointSave``. ``rows`` (default:
    all) keeps only those rows of each batch: one process's share of a multi-process batch
    (``lmstack.distributed.process_rows``), the same windows as in the whole batch.
    """
    _check_positive(**{"data.seq_len": seq_len, "train.batch_size": batch_size})
    _check_stream(stream, seq_len)
    if seed < 0:
        raise DataError(f"data.seed: {seed} is negative: pass a seed >= 0")
    # sys.maxsize batches is "endless": a step counter never gets there.
    ds = grain.MapDataset.range(sys.maxsize).map(_RandomWindows(stream, seq_len, batch_size, seed, rows))
    return iter(ds.to_iter_dataset(_READ_OPTIONS))


def eval_batches(
    stream: TokenStream, *, seq_len: int, batch_size: int, max_batches: int = 0
) -> list[Batch]:
    """Consecutive windows from the start of ``stream``, each predicting its own ``seq_len`` tokens.

    Window ``k`` holds tokens ``[k * seq_len, (k + 1) * seq_len + 1)``, so every token after
    the first is a target exactly once. With ``max_batches`` 0 the whole stream is covered:
    the last window is zero-padded and the last batch filled with padding rows, all marked
    ``segment_ids == 0``, to keep one shape.
    """
    _check_positive(**{"data.seq_len": seq_len, "eval.batch_size": batch_size})
    if max_batches < 0:
        raise DataError(f"eval.batches: {max_batches} is negative: pass 0 (the whole split) or a count")
    _check_stream(stream, seq_len)
    n_windows = -(-(len(stream) - 1) // seq_len)
    if max_batches:
        n_windows = min(n_windows, max_batches * batch_size)
    n_padded = -(-n_windows // batch_size) * batch_size
    # Pad the stream so every window is full length, and mark the padding as segment 0.
    length = seq_len + 1
    padded = TokenStream(
        np.concatenate([stream.tokens, np.zeros(length, np.int32)]),
        np.concatenate([stream.doc_starts, [len(stream)]]),
    )
    rows = padded.windows(np.arange(n_windows) * seq_len, length)
    is_pad = (np.arange(n_windows)[:, None] * seq_len + np.arange(length)) >= len(stream)
    rows = {k: np.where(is_pad, 0, v).astype(np.int32) for k, v in rows.items()}
    rows = {k: np.pad(v, ((0, n_padded - n_windows), (0, 0))) for k, v in rows.items()}
    return [
        {k: v[i : i + batch_size] for k, v in rows.items()}
        for i in range(0, n_padded, batch_size)
    ]


PACKINGS = ("first_fit", "best_fit", "none")


def packed_examples_dataset(
    examples: Sequence[Mapping[str, Sequence[int]]],
    *,
    feature_lengths: Mapping[str, int],
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    packing: str = "first_fit",
    num_packing_bins: int = 0,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """Shuffled examples, each feature truncated to its length, packed into rows and batched.

    For each feature ``f`` a batch holds ``f``, ``f + "_segment_ids"`` and ``f + "_positions"``,
    each int32 ``(batch_size, feature_lengths[f])``; 0 in segment ids is padding, positions
    restart at 0 for each example. Every epoch (``num_epochs`` None: endless) is reshuffled.
    ``packing`` is grain's ``first_fit`` (each example into the first of ``num_packing_bins``
    open rows with room, 0 meaning ``batch_size``; all rows go out when one does not fit),
    ``best_fit`` (into the open row it fills most tightly) or ``none`` (one example per row).
    More open rows pack denser. ``drop_remainder`` False keeps a smaller last batch (with
    ``num_epochs``, for evaluation).
    """
    _check_positive(
        **{"train.batch_size": batch_size},
        **{f"feature_lengths[{k!r}]": v for k, v in feature_lengths.items()},
    )
    if not examples:
        raise DataError("packed examples: no examples: give the objective a non-empty dataset")
    if num_packing_bins < 0:
        raise DataError(f"num_packing_bins: {num_packing_bins} is negative: pass 0 (batch_size) or a count")
    if packing not in PACKINGS:
        raise DataError(f"packing: {packing!r} is not one of {', '.join(PACKINGS)}")
    lengths = dict(feature_lengths)

    def truncate(example: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
        # The packers drop nothing themselves: an example longer than a row would stall them.
        return {f: np.asarray(example[f][:n], np.int32) for f, n in lengths.items()}

    ds = grain.MapDataset.source(examples).shuffle(seed).repeat(num_epochs).map(truncate)
    packer = (grain.experimental.BestFitPackIterDataset if packing == "best_fit"
              else grain.experimental.FirstFitPackIterDataset)
    packed = packer(
        ds.to_iter_dataset(_READ_OPTIONS),
        length_struct=lengths,
        num_packing_bins=num_packing_bins or batch_size,
        seed=seed,
        max_sequences_per_bin=1 if packing == "none" else None,
    )
    return packed.batch(batch_size, drop_remainder=drop_remainder)


def packed_examples_iterator(
    examples: Sequence[Mapping[str, Sequence[int]]],
    *,
    feature_lengths: Mapping[str, int],
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    packing: str = "first_fit",
) -> grain.DatasetIterator:
    """A checkpointable iterator over :func:`packed_examples_dataset`'s batches."""
    return iter(packed_examples_dataset(examples, feature_lengths=feature_lengths, batch_size=batch_size, seed=seed,
                                        num_epochs=num_epochs, packing=packing))


Transform = Callable[[Batch, np.random.Generator], Mapping[str, np.ndarray]]


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """int32 ``[n]`` positions counting each segment's tokens in order: ``positions[i]`` is
    how many earlier entries of ``segment_ids`` (1-D) equal ``segment_ids[i]``. For
    contiguous documents this is :meth:`TokenStream.windows`'s positions; it also numbers a
    document whose tokens a noising transform moved apart (sentence permutation) or
    interleaved with inserted tokens (sentinels, masks)."""
    seg = np.asarray(segment_ids)
    order = np.argsort(seg, kind="stable")
    first = np.searchsorted(seg[order], seg[order], side="left")
    positions = np.empty(len(seg), np.int32)
    positions[order] = np.arange(len(seg)) - first
    return positions


def transformed_windows_iterator(
    stream: TokenStream, *, window_length: int, batch_size: int, seed: int, transform: Transform,
    rows: slice | None = None,
) -> grain.DatasetIterator:
    """An endless grain iterator like :func:`train_iterator`, but each window of
    ``window_length`` tokens goes through ``transform(window, rng)`` (a noising function:
    span corruption, masking, a prefix draw, ...) and the batch stacks its fixed-length
    outputs. ``window`` holds the 1-D ``tokens``, ``segment_ids`` and ``positions`` of one
    window (documents numbered from 1, as in :meth:`TokenStream.windows`). The rng of window
    ``g`` is seeded by ``(seed, g)``: every random choice is per example, so batches are
    deterministic, resumable and the same however a step splits them into microbatches, or
    a multi-process batch into each process's ``rows`` (default: all)."""
    _check_positive(**{"window length": window_length, "train.batch_size": batch_size})
    _check_stream(stream, window_length - 1)
    windows = _RandomWindows(stream, window_length - 1, batch_size, seed, rows)

    def make(batch_index: int) -> Batch:
        batch = windows(batch_index)
        first = batch_index * batch_size + windows.rows.start
        out = [transform({k: v[r] for k, v in batch.items()}, np.random.default_rng([seed, first + r]))
               for r in range(len(batch["tokens"]))]
        return {k: np.stack([r[k] for r in out]) for k in out[0]}

    ds = grain.MapDataset.range(sys.maxsize).map(make)
    return iter(ds.to_iter_dataset(_READ_OPTIONS))


def transformed_eval_batches(
    stream: TokenStream, *, window_length: int, batch_size: int, max_batches: int, seed: int, transform: Transform
) -> list[Batch]:
    """Consecutive non-overlapping windows from the start of ``stream``, each transformed
    (as in :func:`transformed_windows_iterator`) with an rng seeded by ``(seed, window
    index)``; only whole batches (at most ``max_batches``, 0: all that fit)."""
    _check_stream(stream, window_length - 1)
    n = len(stream) // window_length
    n_batches = n // batch_size if not max_batches else min(max_batches, n // batch_size)
    batches = []
    for b in range(max(n_batches, 1)):
        rows = []
        for r in range(batch_size):
            g = (b * batch_size + r) % n
            window = {k: v[0] for k, v in stream.windows(np.array([g * window_length]), window_length).items()}
            rows.append(transform(window, np.random.default_rng([seed, g])))
        batches.append({k: np.stack([row[k] for row in rows]) for k in rows[0]})
    return batches


class _RandomWindows:
    """Batch index -> ``rows`` of a batch of windows at offsets hashed from (seed, window index)."""

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, seed: int, rows: slice | None = None):
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.rows = slice(0, batch_size) if rows is None else rows
        if not 0 <= self.rows.start < self.rows.stop <= batch_size:
            raise DataError(f"rows {self.rows.start}:{self.rows.stop} of a batch of train.batch_size={batch_size}: "
                            f"out of range")
        self.key = _mix64(np.array([seed], np.uint64))
        self.n_starts = np.uint64(len(stream) - seq_len)

    def __call__(self, batch_index: int) -> Batch:
        first = batch_index * self.batch_size
        window = np.arange(first + self.rows.start, first + self.rows.stop, dtype=np.uint64)
        # 64-bit hashes mod a count far below 2**64: the bias is far below 1e-9.
        starts = _mix64(self.key + window) % self.n_starts
        return self.stream.windows(starts.astype(np.int64), self.seq_len + 1)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64: a bijective mix of uint64s whose outputs pass statistical randomness tests."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _encode(documents: Sequence[str], tokenizer: Tokenizer) -> TokenStream:
    head = with_bos(tokenizer, [])
    tail = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return examples_stream([{"tokens": head + tokenizer.encode(doc) + tail} for doc in documents])


def _stream_key(documents: Sequence[str], tokenizer: Tokenizer) -> str:
    h = hashlib.sha256(f"{_STREAM_FORMAT_VERSION}:{tokenizer.identity}".encode())
    for doc in documents:
        data = doc.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))  # so document boundaries count too
        h.update(data)
    return h.hexdigest()[:24]


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if value <= 0:
            raise DataError(f"{key}: {value} is not positive: pass a value >= 1")


def _check_stream(stream: TokenStream, seq_len: int) -> None:
    if len(stream) >= seq_len + 1:
        return
    if stream.name == "val":
        todo = "raise --config.data.val_fraction, lower --config.data.seq_len, or use more data"
    else:
        todo = "lower --config.data.seq_len, lower --config.data.val_fraction, or use more data"
    what = f"the {stream.name} split" if stream.name else "the token stream"
    raise DataError(
        f"data.seq_len: {what} has {len(stream)} tokens, fewer than one window "
        f"of seq_len + 1 = {seq_len + 1}: {todo}"
    )
