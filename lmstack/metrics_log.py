"""Metrics to JSONL (one object per line, easy to diff and plot) and TensorBoard event files."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping


class MetricsWriter:
    """Writes ``WORKDIR/metrics.jsonl`` and TensorBoard events under ``WORKDIR/tb``."""

    def __init__(self, workdir: str | Path, *, jsonl: bool = True, tensorboard: bool = True):
        workdir = Path(workdir)
        self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1) if jsonl else None
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # tensorboardX names its file by the second and opens it "wb": a second writer within the same
            # second (a quick restart, two evaluations) would truncate the first's; the nanoseconds keep them apart.
            self._tb = SummaryWriter(str(workdir / "tb"), filename_suffix=f".{time.time_ns() % 10**9:09d}")

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> None:
        values = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def flush(self) -> None:
        """Make what was written visible to readers now (TensorBoard otherwise buffers up to 2 min)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """Every logged record, in order (a resumed run appends; later records win per step)."""
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
