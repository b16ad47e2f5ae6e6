"""Replay: training batches whose rows mix windows of the run's token stream with windows of
the parent's (experience replay against forgetting in continued pre-training, as in
Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train LLMs").

Of each batch of ``B`` rows, ``round(fraction * B)`` are replay rows, spread evenly over the
batch (:func:`replay_rows`) so every data-parallel shard and every microbatch gets its share.
Row ``r`` of batch ``g`` is window ``g * B + r`` of its stream: a run's row holds exactly
the window :func:`lmstack.data.pipeline.train_iterator` puts there, a replay row the window
of the parent's stream drawn with seed ``seed + 1``. Both depend only on ``(seed, g, r)``,
so the iterator's state is the batch count: deterministic, checkpointable, resume-exact.
"""

from __future__ import annotations

import sys

import grain
import numpy as np

from lmstack.data.pipeline import _READ_OPTIONS, Batch, TokenStream, _check_positive, _check_stream, _RandomWindows
from lmstack.data.sources import DataError


def replay_rows(batch_size: int, fraction: float) -> np.ndarray:
    """bool ``[batch_size]``: which rows of a batch are replay rows, ``round(fraction * batch_size)``
    of them (Python's round, half to even), evenly spaced (row ``r`` is one where
    ``floor((r + 1) k / B) > floor(r k / B)``). DataError for a fraction outside [0, 1)."""
    if not 0 <= fraction < 1:
        raise DataError(f"replay.fraction: {fraction} is outside [0, 1): pass e.g. --config.replay.fraction=0.25")
    k = round(fraction * batch_size)
    r = np.arange(batch_size)
    return (r + 1) * k // batch_size > r * k // batch_size


def replay_iterator(stream: TokenStream, parent: TokenStream, *, fraction: float, seq_len: int, batch_size: int,
                    seed: int, rows: slice | None = None) -> grain.DatasetIterator:
    """An endless grain iterator like :func:`~lmstack.data.pipeline.train_iterator` (int32
    ``(rows, seq_len + 1)`` ``tokens``, ``segment_ids``, ``positions``) whose :func:`replay_rows`
    come from ``parent`` (see the module docstring). ``rows`` (default: all) keeps this
    process's rows of each batch. DataError for a bad fraction or a stream shorter than a window."""
    _check_positive(**{"data.seq_len": seq_len, "train.batch_size": batch_size})
    _check_stream(stream, seq_len)
    _check_stream(parent, seq_len)
    is_replay = replay_rows(batch_size, fraction)
    own = _RandomWindows(stream, seq_len, batch_size, seed, rows)
    replayed = _RandomWindows(parent, seq_len, batch_size, seed + 1, rows)
    mask = is_replay[own.rows][:, None]

    def make(batch_index: int) -> Batch:
        a, b = own(batch_index), replayed(batch_index)
        return {k: np.where(mask, b[k], a[k]) for k in a}

    ds = grain.MapDataset.range(sys.maxsize).map(make)
    return iter(ds.to_iter_dataset(_READ_OPTIONS))
