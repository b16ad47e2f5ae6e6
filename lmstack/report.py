"""Compare runs: a table of each metric's final and best value, the config keys that differ,
and one PNG plot per metric with one line per run.

A run is a workdir written by ``lmstack train``: its ``metrics.jsonl`` (``train/loss``,
``train/lr``, ... and the ``eval/*`` metrics evaluated during training) and, when present,
``eval/results.jsonl`` (one line per checkpoint evaluated afterwards, ``{"step": N, metric:
value, ...}``; metrics not already named ``eval/...`` get that prefix, and at a step both
files hold, ``results.jsonl`` wins). Within a file a later record of the same step wins, as
a resumed run appends. A sweep directory (``runs/NAME`` from ``lmstack sweep``) stands for
its members: the subdirectories that hold runs, sorted by name.

Best value: the minimum for metrics whose last name component has a word meaning lower is
better (loss, perplexity, ppl, nll, error, err, bpb, bpc, wer, cer, kl), the maximum for one
meaning higher is better (accuracy, acc, f1, em, exact, match, mrr, recall, precision, bleu,
rouge, auc, ndcg, pass, score); other metrics get no best value. Tokens are training tokens
consumed, ``step x train.batch_size x data.seq_len`` from the run's config.json (the tokens
per step ``lmstack train`` prints; the logged ``train/tokens`` is one step's loss weight, and
is logged only every ``train.log_every`` steps).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lmstack.config import ConfigError

FORMATS = ("table", "markdown", "csv", "json")
_LOWER = {"loss", "perplexity", "ppl", "nll", "error", "err", "bpb", "bpc", "wer", "cer", "kl"}
_HIGHER = {"accuracy", "acc", "f1", "em", "exact", "match", "mrr", "recall", "precision", "bleu", "rouge",
           "auc", "ndcg", "pass", "score"}
_RUN_FILES = ("metrics.jsonl", "config.json", "eval/results.jsonl")


@dataclass
class RunHistory:
    """One run's metrics: ``series[metric]`` is its (step, value) pairs in step order;
    ``config`` the run's config.json flattened to dotted keys ({} without one)."""

    label: str
    workdir: Path
    config: dict[str, Any]
    series: dict[str, list[tuple[int, float]]]

    @property
    def tokens_per_step(self) -> int | None:
        bs, seq = self.config.get("train.batch_size"), self.config.get("data.seq_len")
        return bs * seq if isinstance(bs, int) and isinstance(seq, int) else None

    @property
    def last_step(self) -> int | None:
        return max((s[-1][0] for s in self.series.values() if s), default=None)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def _records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path``; a last line still being written is not yet a record."""
    lines = path.read_text().splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise ConfigError(f"{path} line {n}: not valid JSON ({e.msg}): fix or delete that line") from None
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_history(workdir: str | os.PathLike, label: str | None = None) -> RunHistory:
    """The metrics of the run in ``workdir`` (see the module docstring for the sources and
    which record wins). Raises ConfigError when ``workdir`` holds neither metrics file, or
    for a line that is not JSON."""
    workdir = Path(workdir)
    by_step: dict[int, dict[str, float]] = {}
    sources = [(workdir / "metrics.jsonl", ""), (workdir / "eval" / "results.jsonl", "eval/")]
    if not any(p.is_file() for p, _ in sources):
        raise ConfigError(f"no metrics.jsonl or eval/results.jsonl in {str(workdir)!r}: pass the workdir of a run "
                          f"written by `lmstack train` (or a sweep directory holding such runs)")
    for path, prefix in sources:
        if not path.is_file():
            continue
        for rec in _records(path):
            step = rec.get("step")
            if not isinstance(step, int):
                continue
            values = by_step.setdefault(step, {})
            for k, v in rec.items():
                if k not in ("step", "time") and _is_number(v):
                    values[k if not prefix or k.startswith(prefix) else prefix + k] = float(v)
    series: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(by_step):
        for k, v in by_step[step].items():
            series.setdefault(k, []).append((step, v))
    cfg_path = workdir / "config.json"
    config = _flatten(json.loads(cfg_path.read_text())) if cfg_path.is_file() else {}
    return RunHistory(label or str(workdir), workdir, config, series)


def _is_run(path: Path) -> bool:
    return any((path / f).is_file() for f in _RUN_FILES)


def find_runs(paths: Sequence[str | os.PathLike]) -> list[RunHistory]:
    """The runs named by ``paths``: a workdir is one run (labelled as given), a sweep directory
    each member that holds metrics (labelled by its name, prefixed by the sweep directory when
    several paths are given; members not yet started are left out). Raises ConfigError for a
    path that is neither."""
    runs: list[RunHistory] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ConfigError(f"{str(p)!r} is not a directory: pass a run's workdir or a sweep directory")
        if _is_run(p):
            runs.append(read_history(p, str(p)))
            continue
        started = sorted(d for d in p.iterdir()
                         if d.is_dir() and any((d / f).is_file() for f in ("metrics.jsonl", "eval/results.jsonl")))
        if not started:
            raise ConfigError(f"{str(p)!r} holds no run (metrics.jsonl) and no sweep member with one: "
                              f"pass a run's workdir or a sweep directory whose members have started")
        runs += [read_history(d, d.name if len(paths) == 1 else str(d)) for d in started]
    return runs


def best_rule(metric: str) -> str | None:
    """"min", "max" or None for ``metric`` (see the module docstring for the words)."""
    words = set(re.split(r"[^a-z0-9]+", metric.rpartition("/")[2].lower()))
    if words & _LOWER:
        return "min"
    return "max" if words & _HIGHER else None


def summarise(series: Sequence[tuple[int, float]], rule: str | None) -> dict[str, Any]:
    """Final and best (by ``rule``) value of one metric's (step, value) pairs, with their steps;
    the first step reaching the best value."""
    final_step, final = series[-1]
    out: dict[str, Any] = {"final": final, "final_step": final_step}
    if rule is not None:
        pick = min if rule == "min" else max
        best = pick(v for _, v in series)
        out.update(best=best, best_step=next(s for s, v in series if v == best), rule=rule)
    return out


def config_differences(runs: Sequence[RunHistory]) -> list[str]:
    """The config keys (dotted, sorted) whose value differs between runs, or that some lack."""
    keys = sorted(set().union(*(r.config for r in runs))) if runs else []
    missing = object()
    return [k for k in keys if len({repr(r.config.get(k, missing)) for r in runs}) > 1]


def table_metrics(runs: Sequence[RunHistory]) -> list[str]:
    """The metrics the table shows: ``train/loss`` and every ``eval/*`` metric any run has."""
    present = set().union(*(r.series for r in runs)) if runs else set()
    return [m for m in ["train/loss"] if m in present] + sorted(m for m in present if m.startswith("eval/"))


def plot_metrics(runs: Sequence[RunHistory]) -> list[str]:
    """The metrics plotted: ``train/loss``, ``train/lr`` and every ``eval/*`` metric any run has."""
    present = set().union(*(r.series for r in runs)) if runs else set()
    return [m for m in ["train/loss", "train/lr"] if m in present] + sorted(m for m in present if m.startswith("eval/"))


def comparison(runs: Sequence[RunHistory]) -> list[dict[str, Any]]:
    """One record per run: ``run``, ``config`` (the differing keys), ``step``, ``tokens`` and
    ``metrics`` (metric -> :func:`summarise`) for :func:`table_metrics`."""
    diffs, metrics = config_differences(runs), table_metrics(runs)
    out = []
    for r in runs:
        step, tps = r.last_step, r.tokens_per_step
        out.append({
            "run": r.label,
            "config": {k: r.config.get(k) for k in diffs},
            "step": step,
            "tokens": step * tps if step is not None and tps is not None else None,
            "metrics": {m: summarise(r.series[m], best_rule(m)) for m in metrics if r.series.get(m)},
        })
    return out


def _show(v: Any, exact: bool) -> str:
    if v is None:
        return "" if exact else "-"
    if isinstance(v, float):
        return repr(v) if exact else f"{v:.5g}"
    return v if isinstance(v, str) else repr(v)


def format_comparison(records: Sequence[dict[str, Any]], fmt: str = "table") -> str:
    """``records`` from :func:`comparison` as an aligned text table, markdown, csv or json.
    Columns: run, the differing config keys, step, tokens, then per metric its final value
    (``M``) and best value (``M best(min)`` / ``M best(max)``). csv and json keep full precision."""
    if fmt == "json":
        return json.dumps(list(records), indent=1)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown report format {fmt!r}: one of {', '.join(FORMATS)}")
    metrics = sorted({m for r in records for m in r["metrics"]}, key=lambda m: (m != "train/loss", m))
    rules = {m: next(r["metrics"][m].get("rule") for r in records if m in r["metrics"]) for m in metrics}
    diffs = list(records[0]["config"]) if records else []
    header = ["run", *diffs, "step", "tokens"]
    for m in metrics:
        header += [m] + ([f"{m} best({rules[m]})"] if rules[m] else [])
    exact = fmt == "csv"
    rows = []
    for r in records:
        row = [r["run"], *(r["config"][k] for k in diffs), r["step"], r["tokens"]]
        for m in metrics:
            s = r["metrics"].get(m, {})
            row += [s.get("final")] + ([s.get("best")] if rules[m] else [])
        rows.append([_show(v, exact) for v in row])
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([header, *rows])
        return buf.getvalue().rstrip("\n")
    if fmt == "markdown":
        return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *rows])
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in lines)


def plot_runs(runs: Sequence[RunHistory], out: str | os.PathLike) -> list[Path]:
    """One PNG per metric of :func:`plot_metrics` in ``out``: the metric against step (left) and
    against training tokens (right), one line per run, run i in colour ``Ci`` in every figure. Rendered off-screen (Agg, no pyplot);
    file names are the metric with ``/`` and other odd characters as ``_`` (``eval_loss.png``)."""
    from matplotlib.figure import Figure  # the Agg canvas: nothing is displayed

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in plot_metrics(runs):
        fig = Figure(figsize=(11, 4))
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=0.22)  # cheaper than a layout engine
        by_step, by_tokens = fig.subplots(1, 2)
        for i, r in enumerate(runs):
            points = r.series.get(metric)
            if not points:
                continue
            steps, values = zip(*points)
            # a run keeps its colour in every figure, also where another run lacks the metric
            style = {"marker": "." if metric.startswith("eval/") else None, "label": r.label, "color": f"C{i % 10}"}
            by_step.plot(steps, values, **style)
            if r.tokens_per_step is not None:
                by_tokens.plot([s * r.tokens_per_step for s in steps], values, **style)
        for ax, xlabel in ((by_step, "step"), (by_tokens, "training tokens")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        by_step.legend(fontsize="small")
        fig.suptitle(metric)
        path = out / (re.sub(r"[^A-Za-z0-9.@-]+", "_", metric) + ".png")
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


def default_out(paths: Sequence[str | os.PathLike]) -> Path:
    """``W/report`` for one path (a run or a sweep directory), else ``report/`` in the paths'
    common parent."""
    if len(paths) == 1:
        return Path(paths[0]) / "report"
    return Path(os.path.commonpath([os.path.abspath(p) for p in paths])) / "report"


def report(paths: Sequence[str | os.PathLike], fmt: str = "table",
           out: str | os.PathLike | None = None) -> tuple[str, list[Path]]:
    """The comparison of the runs in ``paths`` formatted as ``fmt``, and the PNG plots written
    to ``out`` (default :func:`default_out`). Raises ConfigError for a path holding no run."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown report format {fmt!r}: one of {', '.join(FORMATS)}")
    runs = find_runs(paths)
    text = format_comparison(comparison(runs), fmt)
    return text, plot_runs(runs, out if out is not None else default_out(paths))
