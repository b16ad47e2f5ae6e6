"""Per-step metric curves of a run, read from its ``metrics.jsonl``, drawn to a PNG (matplotlib,
Agg): the one plotting helper of the measuring tools (rl_table.py's reward curves, the DPO
family's implicit rewards in preference_table.py, gsm8k_grpo.py's reward).

    python tools/curves.py WORKDIR train/reward [eval/rollout_reward/reward ...] --out curve.png

Each named metric is one line over the steps that logged it (a resumed run's later record wins
per step, as :func:`lmstack.metrics_log.read_metrics` appends them); ``smooth`` k > 1 adds a
trailing mean of k logged values beside the raw line of that metric.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Mapping, Sequence

from lmstack.metrics_log import read_metrics

Series = dict[int, float]


def series(workdir: str | Path, name: str) -> Series:
    """``{step: value}`` of metric ``name`` (as logged, e.g. ``train/reward``) in ``workdir``'s
    metrics.jsonl; a later record of the same step replaces an earlier one."""
    out: Series = {}
    for record in read_metrics(workdir):
        if name in record:
            out[int(record["step"])] = float(record[name])
    return dict(sorted(out.items()))


def trailing_mean(values: Sequence[float], k: int) -> list[float]:
    """The mean of each value and the ``k - 1`` before it (fewer at the start)."""
    return [statistics.mean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def plot_curves(curves: Mapping[str, Series], path: str | Path, *, title: str = "", xlabel: str = "step",
                ylabel: str = "", smooth: Mapping[str, int] | None = None, ylim: tuple[float, float] | None = None,
                markers: Sequence[str] = ()) -> Path:
    """Draw each ``label -> {step: value}`` of ``curves`` as a line (``markers``: the labels
    drawn with points, for sparse series such as held-out evaluations; ``smooth[label] = k``:
    the raw line in grey plus its trailing mean of k values) and save the PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smooth = dict(smooth or {})
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, points) in enumerate(curves.items()):
        steps, values = list(points), list(points.values())
        color = f"C{i}"
        if smooth.get(label, 1) > 1:
            ax.plot(steps, values, color="0.75", label=f"{label} (each step)")
            ax.plot(steps, trailing_mean(values, smooth[label]), color=color,
                    label=f"{label}, mean of {smooth[label]} steps")
        else:
            ax.plot(steps, values, "o-" if label in markers else "-", color=color, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("metrics", nargs="+", help="logged names, e.g. train/reward")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    print(plot_curves({m: series(args.workdir, m) for m in args.metrics}, args.out, title=args.title))


if __name__ == "__main__":
    main()
