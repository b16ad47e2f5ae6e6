"""tools/curves.py: per-step series read back from a run's metrics.jsonl as the trainer writes
it (a resumed run's later record of a step wins), the trailing mean against numpy, and a PNG."""

from __future__ import annotations

import numpy as np

from lmstack.metrics_log import MetricsWriter
from tools.curves import plot_curves, series, trailing_mean


def test_series_reads_each_steps_last_record(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        writer.write(step, {"reward": step / 10})
    writer.write(2, {"reward": 0.9})  # a resumed run logs step 2 again
    writer.write(3, {"accuracy": 0.5}, prefix="eval")
    writer.close()
    assert series(tmp_path, "train/reward") == {1: 0.1, 2: 0.9, 3: 0.3}
    assert list(series(tmp_path, "train/reward")) == [1, 2, 3]
    assert series(tmp_path, "eval/accuracy") == {3: 0.5}
    assert series(tmp_path, "train/missing") == {}


def test_trailing_mean_matches_numpy():
    values = np.random.default_rng(0).normal(size=23)
    k = 5
    want = [values[max(0, i - k + 1):i + 1].mean() for i in range(len(values))]
    np.testing.assert_allclose(trailing_mean(list(values), k), want, rtol=1e-12)


def test_plot_writes_a_png(tmp_path):
    curves = {"reward": {s: s / 10 for s in range(1, 11)}, "held-out": {0: 0.2, 10: 0.3}}
    path = plot_curves(curves, tmp_path / "c.png", title="t", smooth={"reward": 3}, ylim=(0, 1),
                       markers=("held-out",))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
