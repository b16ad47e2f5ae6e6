"""``lmstack report``: final and best values recomputed by hand from the metrics files, the
differing config keys, the csv/json formats read back, sweep directories, the PNG plots.

The runs are written here as files (metrics.jsonl, eval/results.jsonl, config.json) shaped
like what ``lmstack train`` writes; tests/test_sweep.py reports on real trained runs.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from lmstack.cli import main
from lmstack.configs.base import base_config
from lmstack.report import best_rule, comparison, find_runs, format_comparison, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_COLOURS = ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E))  # matplotlib's C0 and C1: runs a and b


def write_run(workdir: Path, rng: np.random.Generator, *, steps: int, lr: float, resumed_at: int | None = None,
              results_steps: tuple[int, ...] = ()) -> list[dict]:
    """A run's files; returns every record in the order a reader meets them (metrics.jsonl, then
    eval/results.jsonl with its metrics named eval/...)."""
    workdir.mkdir(parents=True)
    cfg = base_config()
    cfg.optimizer.lr, cfg.train.steps, cfg.train.batch_size, cfg.data.seq_len = lr, steps, 4, 16
    (workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    records = []

    def train_record(step: int) -> dict:
        return {"step": step, "time": 1.0 * step, "train/loss": float(rng.uniform(2, 5)),
                "train/lr": lr * step / steps, "train/tokens": 64.0, "train/grad_norm": float(rng.uniform(0, 3))}

    def eval_record(step: int) -> dict:
        loss = float(rng.uniform(2, 5))
        return {"step": step, "time": 1.0 * step, "eval/loss": loss, "eval/perplexity": float(np.exp(loss)),
                "eval/accuracy": float(rng.uniform(0, 1))}

    for step in range(1, steps + 1):
        records.append(train_record(step))
        if step % 4 == 0:
            records.append(eval_record(step))
    if resumed_at is not None:  # a resumed run logs the steps after its checkpoint again
        for step in range(resumed_at + 1, steps + 1):
            records.append(train_record(step))
            if step % 4 == 0:
                records.append(eval_record(step))
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if results_steps:
        results = [{"step": s, "loss": float(rng.uniform(2, 5)), "linear_probe/accuracy": float(rng.uniform(0, 1))}
                   for s in results_steps]
        (workdir / "eval").mkdir()
        (workdir / "eval" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
        records += [{"step": r["step"], **{f"eval/{k}": v for k, v in r.items() if k != "step"}} for r in results]
    return records


def by_hand(records: list[dict], metric: str, pick) -> tuple[float, float]:
    """(final, best) of ``metric``: per step the last record holding it, then the value at the
    largest step and ``pick`` (min or max) over the steps."""
    last = {}
    for r in records:
        if metric in r:
            last[r["step"]] = r[metric]
    return last[max(last)], pick(last.values())


@pytest.fixture
def two_runs(tmp_path):
    rng = np.random.default_rng(0)
    a = write_run(tmp_path / "runs" / "a", rng, steps=12, lr=1e-3, resumed_at=6)
    b = write_run(tmp_path / "runs" / "b", rng, steps=8, lr=3e-3, results_steps=(4, 8))
    return tmp_path / "runs", {"a": a, "b": b}


RULES = {"train/loss": min, "eval/loss": min, "eval/perplexity": min, "eval/accuracy": max,
         "eval/linear_probe/accuracy": max}


def test_final_and_best_values_match_the_metrics_files(two_runs, capsys):
    root, records = two_runs
    assert main(["report", str(root / "a"), str(root / "b"), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in out] == [str(root / "a"), str(root / "b")]
    for row, name in zip(out, "ab"):
        assert row["config"] == {"optimizer.lr": {"a": 1e-3, "b": 3e-3}[name],
                                 "train.steps": {"a": 12, "b": 8}[name]}
        assert row["step"] == {"a": 12, "b": 8}[name]
        assert row["tokens"] == row["step"] * 4 * 16
        expected = {m for m in RULES if any(m in r for r in records[name])}
        assert set(row["metrics"]) == expected
        for metric in expected:
            final, best = by_hand(records[name], metric, RULES[metric])
            got = row["metrics"][metric]
            assert (got["final"], got["best"], got["rule"]) == (final, best, RULES[metric].__name__)
    # the resumed run's repeated steps count once, with the later values
    logged_at_12 = [r["train/loss"] for r in records["a"] if r["step"] == 12 and "train/loss" in r]
    assert out[0]["metrics"]["train/loss"]["final"] == logged_at_12[1] != logged_at_12[0]
    # at a step both files hold, the checkpoint evaluation (eval/results.jsonl) wins
    assert out[1]["metrics"]["eval/loss"]["final"] == records["b"][-1]["eval/loss"]


def test_csv_and_text_tables_show_the_same_values(two_runs, capsys):
    root, records = two_runs
    assert main(["report", str(root / "a"), str(root / "b"), "--format", "csv", "--out", str(root / "r")]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert list(rows[0])[:5] == ["run", "optimizer.lr", "train.steps", "step", "tokens"]
    final, best = by_hand(records["b"], "eval/perplexity", min)
    assert float(rows[1]["eval/perplexity"]) == final and float(rows[1]["eval/perplexity best(min)"]) == best
    assert rows[0]["eval/linear_probe/accuracy"] == ""  # run a has no checkpoint evaluation
    assert "train/grad_norm" not in rows[0]  # only loss and evaluated metrics are tabled
    assert captured.err.splitlines()[0] == f"wrote {root / 'r' / 'train_loss.png'}"

    runs = find_runs([root / "a", root / "b"])
    text = format_comparison(comparison(runs), "table")
    header, dashes, line_a, line_b = (re.split(r"\s{2,}", line) for line in text.splitlines())
    assert header == list(rows[0])
    cells = dict(zip(header, line_a))
    final, best = by_hand(records["a"], "train/loss", min)
    assert [cells[k] for k in ("run", "optimizer.lr", "train.steps", "step", "tokens")] == \
        [str(root / "a"), "0.001", "12", "12", "768"]
    assert (cells["train/loss"], cells["train/loss best(min)"]) == (f"{final:.5g}", f"{best:.5g}")
    assert cells["eval/linear_probe/accuracy"] == "-"
    markdown = format_comparison(comparison(runs), "markdown")
    assert markdown.splitlines()[0] == "| " + " | ".join(header) + " |"
    assert markdown.splitlines()[1] == "| " + " | ".join(["---"] * len(header)) + " |"


def test_plots_are_pngs_one_per_metric(two_runs, capsys):
    root, _ = two_runs
    _, pngs = report([root / "a", root / "b"], out=root / "plots")
    assert [p.name for p in pngs] == ["train_loss.png", "train_lr.png", "eval_accuracy.png",
                                      "eval_linear_probe_accuracy.png", "eval_loss.png", "eval_perplexity.png"]
    from matplotlib.image import imread

    for p in pngs:
        assert p.read_bytes()[:8] == PNG_SIGNATURE
        image = imread(p)
        assert image.shape == (400, 1100, 4)  # 11 x 4 inches at 100 dpi: two panels, step and tokens
        rgb = (image[..., :3] * 255).round().astype(np.uint8)
        drawn = [(rgb == color).all(axis=-1).sum() > 20 for color in RUN_COLOURS]
        assert drawn == [p.name != "eval_linear_probe_accuracy.png", True], p.name  # only run b has that one


def test_a_sweep_directory_compares_its_members(two_runs, capsys):
    root, records = two_runs
    (root / "c").mkdir()
    (root / "c" / "overrides.json").write_text("{}")  # a member not started yet is left out
    assert main(["report", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["a", "b"]
    assert (root / "report" / "eval_loss.png").is_file()


def test_best_rule_words():
    assert [best_rule(m) for m in ("train/loss", "eval/perplexity", "eval/linear_probe/train_accuracy",
                                   "eval/retrieval/recall@1", "eval/retrieval/mrr", "train/grad_norm")] == \
        ["min", "min", "max", "max", "max", None]


def test_bad_input_is_one_line(two_runs, tmp_path, capsys):
    root, _ = two_runs
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err == (f"lmstack: error: {str(tmp_path / 'empty')!r} holds no run (metrics.jsonl) "
                                       f"and no sweep member with one: pass a run's workdir or a sweep directory "
                                       f"whose members have started\n")
    path = root / "a" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + ['{"step": 13, "train/lo']))  # a line still being written: ignored
    assert find_runs([root / "a"])[0].last_step == 12
    path.write_text("\n".join(lines[:3] + ["{oops"] + lines[3:]) + "\n")
    assert main(["report", str(root / "a")]) == 2
    assert capsys.readouterr().err == (f"lmstack: error: {path} line 4: not valid JSON (Expecting property name "
                                       f"enclosed in double quotes): fix or delete that line\n")
