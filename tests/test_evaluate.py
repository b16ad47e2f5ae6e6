"""``lmstack eval`` on checkpoints: the latest, one step, every step, and watching a running
job, each step evaluated once across restarts; results.jsonl and TensorBoard at the
checkpoint's step; never a save in progress; one-line errors for bad flags and directories.

One tiny run (checkpoints at 2, 4, 6, 8) is trained once per module while ``lmstack eval
--watch`` in another process evaluates its checkpoints as they appear; the other tests
evaluate copies of it. The reference numbers are the held-out losses the training loop
measured on its own state at the same steps (``eval.every=2``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmstack.cli import main
from lmstack.config import load_saved_config
from lmstack.configs.base import base_config
from lmstack.evaluate import CheckpointEvaluator, read_results
from lmstack.metrics_log import MetricsWriter, read_metrics
from lmstack.run import Run
from lmstack.train import train
from tests.helpers import read_tb_scalars

STEPS = (2, 4, 6, 8)
REPO = Path(__file__).resolve().parents[1]
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes step N into N.orbax-checkpoint-tmp, then renames


def tiny_config():
    """A 2-layer d=32 byte-level model, 8 steps, a checkpoint and an in-training eval every 2."""
    c = base_config()
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff = 32, 2, 4, 64
    c.model.dtype = "float32"
    c.data.source = "stdlib"
    c.data.max_chars = 20_000
    c.data.seq_len = 32
    c.data.tokenizer.kind = "byte"
    c.train.batch_size = 4
    c.train.steps = STEPS[-1]
    c.train.log_every = 1
    c.train.progress = False
    c.optimizer.warmup_steps = 2
    c.optimizer.lr = 3e-3
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.checkpoint.every = 2
    c.checkpoint.keep = 10
    c.eval.every = 2
    c.eval.batches = 2
    c.sample.max_new_tokens = 2
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A job starts (its run files written), ``lmstack eval --watch`` starts on it in another
    process, and only once that is polling does the job train and save: (workdir, the
    watcher's records, its stderr, training's held-out loss by step)."""
    workdir = tmp_path_factory.mktemp("evaluate") / "run"
    Run.for_training(tiny_config(), workdir)  # what a starting job writes before its first step
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "lmstack.cli", "eval", "--workdir", str(workdir), "--watch",
           "--poll-seconds", "0.05", "--timeout-seconds", "300"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        assert first.startswith("watching "), first + proc.stderr.read()
        assert not (workdir / "checkpoints").exists()
        train(tiny_config(), workdir)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    in_training = {r["step"]: r["eval/loss"] for r in read_metrics(workdir) if "eval/loss" in r}
    assert sorted(in_training) == list(STEPS)
    return workdir, [json.loads(line) for line in out.splitlines()], first + err, in_training


@pytest.fixture
def fresh(trained, tmp_path):
    """A copy of the trained run with no evaluation results."""
    dst = tmp_path / "run"
    shutil.copytree(trained[0], dst, ignore=shutil.ignore_patterns("eval"))
    return dst


def cli(capsys, argv: list[str]) -> tuple[int, list[dict], str]:
    """(exit status, the JSON lines on stdout, stderr) of ``lmstack ARGV``."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, [json.loads(line) for line in out.splitlines()], err


def error_of(capsys, argv: list[str]) -> str:
    rc, records, err = cli(capsys, argv)
    assert rc == 2 and not records
    assert err.count("\n") == 1, err
    return err.removeprefix("lmstack: error: ").rstrip("\n")


def assert_matches_training(records: list[dict], in_training: dict[int, float]) -> None:
    for r in records:
        assert abs(r["loss"] - in_training[r["step"]]) <= 1e-5, r
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-6)


def assert_tensorboard(workdir: Path, records: list[dict]) -> None:
    """``eval/METRIC`` at each record's step, as float32 (what TensorBoard stores); the last record per step wins."""
    tb = read_tb_scalars(workdir / "eval" / "tb")
    for key in ("loss", "perplexity"):
        want = {r["step"]: r[key] for r in records}
        assert tb[f"eval/{key}"] == {s: np.float32(v) for s, v in want.items()}, key


def same_numbers(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "time"} == {k: v for k, v in b.items() if k != "time"}


# ----------------------------------------------------------------------------- watching


def test_watch_evaluates_each_checkpoint_of_a_running_job_once(trained):
    workdir, records, err, in_training = trained
    assert [r["step"] for r in records] == list(STEPS)  # each once, in order, until train.steps
    assert "step 8 (train.steps) is evaluated: done" in err
    assert_matches_training(records, in_training)
    assert read_results(workdir) == records
    assert_tensorboard(workdir, records)


def test_restarted_watch_evaluates_nothing_new(capsys, trained):
    workdir, records, _, _ = trained
    t0 = time.perf_counter()
    rc, printed, err = cli(capsys, ["eval", "--workdir", str(workdir), "--watch", "--poll-seconds", "0.05",
                                    "--timeout-seconds", "30"])
    assert rc == 0 and printed == []
    assert "step 8 (train.steps) is evaluated: done" in err
    assert time.perf_counter() - t0 < 30  # stopped because the final step is done, not by the timeout
    assert read_results(workdir) == records


def test_watch_never_reads_a_save_in_progress_and_resumes(capsys, fresh, trained):
    """Mid-run as a restarted watcher finds it: 2 and 4 saved and already evaluated, 6 being
    written (orbax's temporary directory, no commit marker, no array data yet), 8 not started."""
    watched = trained[1]
    ckpts = fresh / "checkpoints"
    for step in (6, 8):
        shutil.move(ckpts / str(step), fresh / f"saved_{step}")
    tmp = ckpts / f"6{TMP_SUFFIX}"
    shutil.copytree(fresh / "saved_6", tmp)
    for marker in tmp.rglob("commit_success.txt"):
        marker.unlink()
    shutil.rmtree(tmp / "state" / "d")
    (fresh / "eval").mkdir()
    (fresh / "eval" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in watched[:2]))
    with CheckpointEvaluator(load_saved_config(fresh), fresh) as ev:
        assert ev.steps() == [2, 4] and ev.done() == {2, 4}
    assert error_of(capsys, ["eval", "--workdir", str(fresh), "--step", "6"]) == (
        f"no checkpoint for step 6 in {ckpts} (have: 2, 4): pass --step with one of those, 'all', "
        f"or leave it out for the latest")

    rc, first, err = cli(capsys, ["eval", "--workdir", str(fresh), "--watch", "--poll-seconds", "0.05",
                                  "--timeout-seconds", "0.5"])
    assert rc == 0 and first == []  # 6 is not there yet: nothing to evaluate (reading it would fail)
    assert "no new checkpoint within --timeout-seconds=0.5: stopped before step 8 (train.steps)" in err
    assert tmp.is_dir()  # a read-only watcher leaves the run's directory alone

    # The save completes the way orbax does it (the finished step renamed into place), the run saves 8.
    shutil.rmtree(tmp)
    for step in (6, 8):
        shutil.copytree(fresh / f"saved_{step}", ckpts / f"{step}{TMP_SUFFIX}")
        (ckpts / f"{step}{TMP_SUFFIX}").rename(ckpts / str(step))
    rc, second, err = cli(capsys, ["eval", "--workdir", str(fresh), "--watch", "--poll-seconds", "0.05"])
    assert rc == 0 and [r["step"] for r in second] == [6, 8]
    assert "step 8 (train.steps) is evaluated: done" in err
    assert read_results(fresh) == watched[:2] + second
    assert_matches_training(second, trained[3])
    assert all(same_numbers(a, b) for a, b in zip(second, watched[2:]))  # as the live run's watcher


# ----------------------------------------------------------------------------- latest, one step, all


def test_eval_latest_one_step_and_all(capsys, fresh, trained):
    """Each step alone gives the numbers the live watcher got restoring one after another
    into one run; ``--step all`` adds each missing step once per settings."""
    watched = {r["step"]: r for r in trained[1]}
    rc, latest, _ = cli(capsys, ["eval", "--workdir", str(fresh)])
    assert rc == 0 and [r["step"] for r in latest] == [8]
    rc, at_4, _ = cli(capsys, ["eval", "--workdir", str(fresh), "--step", "4"])
    assert rc == 0 and [r["step"] for r in at_4] == [4]
    assert abs(at_4[0]["loss"] - latest[0]["loss"]) > 1e-3  # really another checkpoint

    path = fresh / "eval" / "results.jsonl"
    with open(path, "a") as f:  # a writer killed mid-line
        f.write('{"step": 2, "loss": 3.')
    assert read_results(fresh) == latest + at_4
    rc, rest, err = cli(capsys, ["eval", "--workdir", str(fresh), "--step", "all"])
    assert rc == 0 and [r["step"] for r in rest] == [2, 6]
    assert f"steps 4, 8: already in {path}, skipped" in err
    records = latest + at_4 + rest
    assert read_results(fresh) == records  # the cut line is gone, not glued to the next
    assert_matches_training(records, trained[3])
    assert all(same_numbers(r, watched[r["step"]]) for r in records)
    assert_tensorboard(fresh, records)

    rc, again, err = cli(capsys, ["eval", "--workdir", str(fresh), "--step", "all"])
    assert rc == 0 and again == []
    assert f"steps 2, 4, 6, 8: already in {path}, skipped" in err
    # Other settings measure something else: evaluated again, recorded apart.
    rc, one_batch, _ = cli(capsys, ["eval", "--workdir", str(fresh), "--step", "all", "--config.eval.batches=1"])
    assert rc == 0 and [r["step"] for r in one_batch] == list(STEPS)
    assert {r["config_digest"] for r in one_batch}.isdisjoint({r["config_digest"] for r in records})
    assert all(r["loss"] != watched[r["step"]]["loss"] for r in one_batch)
    assert read_results(fresh) == records + one_batch


# ----------------------------------------------------------------------------- bad input


def test_bad_step_flags(capsys, fresh):
    w = str(fresh)
    assert error_of(capsys, ["eval", "--workdir", w, "--step", "5"]) == (
        f"no checkpoint for step 5 in {fresh / 'checkpoints'} (have: 2, 4, 6, 8): pass --step with one of those, "
        f"'all', or leave it out for the latest")
    assert error_of(capsys, ["eval", "--workdir", w, "--step", "last"]) == (
        "--step='last': not a checkpoint step: pass a step number, 'all' for every saved step, "
        "or leave it out for the latest")
    assert error_of(capsys, ["eval", "--workdir", w, "--step", "4", "--watch"]) == (
        "--watch evaluates every checkpoint as it is saved: leave out --step=4")
    assert error_of(capsys, ["eval", "--workdir", w, "--poll-seconds", "5"]) == (
        "--poll-seconds applies only with --watch: add --watch or leave out --poll-seconds")
    assert error_of(capsys, ["eval", "--workdir", w, "--watch", "--timeout-seconds", "0"]) == (
        "--timeout-seconds=0.0: must be > 0 seconds")
    assert not (fresh / "eval").exists()


def test_a_directory_that_is_not_a_run(capsys, fresh, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for flags in ([], ["--watch"]):
        assert error_of(capsys, ["eval", "--workdir", str(empty), *flags]) == (
            f"workdir {str(empty)!r} is not a run (no config.json and no run_spec.json): pass the --workdir given "
            f"to `lmstack train` (or `lmstack import`); a starting run writes them before step 1")
    (fresh / "run_spec.json").unlink()
    assert error_of(capsys, ["eval", "--workdir", str(fresh), "--watch"]) == (
        f"workdir {str(fresh)!r} is not a run (no run_spec.json): pass the --workdir given "
        f"to `lmstack train` (or `lmstack import`); a starting run writes them before step 1")
    missing = tmp_path / "nowhere"
    assert error_of(capsys, ["eval", "--workdir", str(missing)]) == (
        f"workdir {str(missing)!r} does not exist: pass the --workdir given to `lmstack train` (or `lmstack import`)")


def test_a_run_with_no_checkpoint_yet(capsys, fresh):
    shutil.rmtree(fresh / "checkpoints")
    assert error_of(capsys, ["eval", "--workdir", str(fresh)]) == (
        f"no finished checkpoint in {fresh / 'checkpoints'} yet: wait for `lmstack train` to save one "
        f"(every checkpoint.every=2 steps), or pass --watch to evaluate each as it is saved")


def test_tensorboard_writers_within_one_second_keep_each_others_events(tmp_path):
    for step in (1, 2, 3):  # three evaluations' writers, opened and closed at once
        writer = MetricsWriter(tmp_path, jsonl=False)
        writer.write(step, {"loss": float(step)}, prefix="eval")
        writer.close()
    assert len(list((tmp_path / "tb").iterdir())) == 3
    assert read_tb_scalars(tmp_path / "tb")["eval/loss"] == {1: 1.0, 2: 2.0, 3: 3.0}
