"""The training loop end to end: exact resume after SIGKILL and SIGTERM, no half-written
checkpoint taken as the latest, restore onto another mesh, and the metrics files.

The resume tests run ``python -m lmstack.cli train`` as a subprocess on a tiny experiment
(written to a temporary ``LMSTACK_EXPERIMENTS`` directory) and signal it mid-run. Every
subprocess gets the same environment (this session's ``XLA_FLAGS``/``JAX_PLATFORMS`` and a
shared persistent compilation cache, so only the first run compiles), hence the same
compiled programs: resumed losses must equal the uninterrupted run's exactly.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lmstack.checkpoint import Checkpointer
from lmstack.config import load_saved_config
from lmstack.evaluate import evaluate
from lmstack.run import Run
from lmstack.sharding import RULES, make_mesh
from lmstack.train import train
from tests.helpers import read_tb_scalars, tiny_config

STEPS = 30
SIGNAL_AFTER = 13  # signal the run once this step is logged: after the checkpoint at 10, before 15
REPO = Path(__file__).resolve().parents[1]
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes step N into N.orbax-checkpoint-tmp, then renames

TINY_EXPERIMENT = f'''"""A tiny byte-level model on 20k characters of the standard library (tests only)."""

from lmstack.configs.base import base_config


def get_config(arg=None):
    c = base_config()
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff = 32, 2, 4, 64
    c.model.dtype = "float32"
    c.model.dropout = 0.1  # so the per-step RNG matters: a resume must continue it too
    c.data.source = "stdlib"
    c.data.max_chars = 20_000
    c.data.seq_len = 32
    c.data.tokenizer.kind = "byte"
    c.train.batch_size = 4
    c.train.steps = {STEPS}
    c.train.log_every = 1
    c.train.progress = False
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 3
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.checkpoint.every = 5
    c.eval.every = 10
    c.eval.batches = 2
    c.sample.max_new_tokens = 4
    return c
'''


# ----------------------------------------------------------------------------- helpers


def read_records(workdir: Path) -> list[dict]:
    """Every complete line of metrics.jsonl (a line still being written is not yet a record)."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def last_per_step(records: list[dict], key: str) -> dict[int, float]:
    """step -> value of ``key`` in the last record of that step holding it (a resumed run appends)."""
    return {r["step"]: r[key] for r in records if key in r}


def max_train_step(workdir: Path) -> int:
    return max(last_per_step(read_records(workdir), "train/loss"), default=0)


class Runner:
    """``python -m lmstack.cli train tiny --workdir W`` in a fixed environment."""

    def __init__(self, root: Path):
        exp = root / "experiments"
        exp.mkdir()
        (exp / "tiny.py").write_text(TINY_EXPERIMENT)
        self.root = root
        self.env = {
            **os.environ,  # XLA_FLAGS, JAX_PLATFORMS and LMSTACK_CACHE as tests/conftest.py set them
            "LMSTACK_EXPERIMENTS": str(exp),
            "JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            "PYTHONUNBUFFERED": "1",
        }
        self.n = 0

    def start(self, workdir: Path) -> tuple[subprocess.Popen, Path]:
        self.n += 1
        log = self.root / f"run{self.n}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lmstack.cli", "train", "tiny", "--workdir", str(workdir)],
                stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
            )
        return proc, log

    def run(self, workdir: Path) -> str:
        """Run to completion; the output (stdout and stderr)."""
        proc, log = self.start(workdir)
        rc = proc.wait(timeout=120)
        out = log.read_text()
        assert rc == 0, out
        return out

    def run_and_signal(self, workdir: Path, sig: int) -> tuple[int, str, int]:
        """Start a run and send ``sig`` once step SIGNAL_AFTER is logged: (exit status, output, step seen)."""
        proc, log = self.start(workdir)
        deadline = time.monotonic() + 120
        seen = 0
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                seen = max_train_step(workdir)
                if seen >= SIGNAL_AFTER:
                    proc.send_signal(sig)
                    break
                time.sleep(0.002)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out = log.read_text()
        assert seen >= SIGNAL_AFTER, f"the run ended (status {rc}) before step {SIGNAL_AFTER} was seen:\n{out}"
        return rc, out, seen


def resumed_step(output: str) -> int:
    m = re.search(r"^resumed from (\S+) at step (\d+)$", output, re.M)
    assert m, f"the run did not resume:\n{output}"
    return int(m.group(2))


def finalised_steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


COMPARED = ("train/loss", "train/grad_norm", "train/lr", "train/accuracy", "eval/loss")


def assert_same_numbers(records: list[dict], reference: list[dict]) -> None:
    """Per-step values (last record per step wins) are exactly the reference's."""
    for key in COMPARED:
        got, want = last_per_step(records, key), last_per_step(reference, key)
        assert got.keys() == want.keys(), key
        diff = {s: (got[s], want[s]) for s in want if got[s] != want[s]}
        assert not diff, f"{key} differs from the uninterrupted run at (step: (got, want)) {diff}"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    return Runner(tmp_path_factory.mktemp("train-subprocess"))


@pytest.fixture(scope="module")
def reference(runner) -> tuple[Path, list[dict], str]:
    """An uninterrupted run: (workdir, metrics records, output)."""
    workdir = runner.root / "reference"
    out = runner.run(workdir)
    assert "resumed from" not in out
    return workdir, read_records(workdir), out


@pytest.fixture(scope="module")
def sigtermed(runner, reference) -> dict:
    """A run stopped by SIGTERM, and a copy of its workdir as it was right after stopping."""
    workdir = runner.root / "sigterm"
    rc, out, seen = runner.run_and_signal(workdir, signal.SIGTERM)
    snapshot = runner.root / "sigterm-snapshot"
    shutil.copytree(workdir, snapshot)
    return {"workdir": workdir, "snapshot": snapshot, "rc": rc, "out": out, "seen": seen}


# ----------------------------------------------------------------------------- tests


def test_uninterrupted_run_matches_its_config(reference):
    workdir, records, out = reference
    losses = last_per_step(records, "train/loss")
    assert sorted(losses) == list(range(1, STEPS + 1))  # log_every=1: every step once
    assert len([r for r in records if "train/loss" in r]) == STEPS
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[STEPS] < losses[1] - 0.5  # it learns
    assert finalised_steps(workdir) == [20, 25, 30]  # every 5, keep 3
    assert "final evaluation at step 30: loss " in out and " perplexity " in out


def test_sigkill_resume_is_exact(runner, reference):
    workdir = runner.root / "sigkill"
    rc, out, seen = runner.run_and_signal(workdir, signal.SIGKILL)
    assert rc == -signal.SIGKILL, out
    killed_at = max_train_step(workdir)
    assert SIGNAL_AFTER <= killed_at < STEPS
    have = finalised_steps(workdir)
    assert have and max(have) <= killed_at
    n_killed = len(read_records(workdir))

    out2 = runner.run(workdir)
    start = resumed_step(out2)
    assert start == max(have) and 0 < start <= killed_at  # the last finalised checkpoint
    records = read_records(workdir)
    # The resumed run logs from start + 1 on: the first train record after the killed run's.
    first_resumed = next(r for r in records[n_killed:] if "train/loss" in r)
    assert first_resumed["step"] == start + 1
    assert_same_numbers(records, reference[1])
    # Both the killed run's records and the resumed run's agree with the reference, not just the last.
    ref_loss = last_per_step(reference[1], "train/loss")
    for r in records:
        if "train/loss" in r:
            assert r["train/loss"] == ref_loss[r["step"]], r


def test_sigterm_saves_exits_zero_and_resumes(runner, reference, sigtermed):
    rc, out, workdir = sigtermed["rc"], sigtermed["out"], sigtermed["workdir"]
    assert rc == 0, out
    m = re.search(r"received signal 15: saved a checkpoint at step (\d+) in (\S+); re-run the same command", out)
    assert m, out
    stopped = int(m.group(1))
    assert SIGNAL_AFTER <= stopped < STEPS
    assert Path(m.group(2)) == (workdir / "checkpoints").resolve()
    snap = sigtermed["snapshot"]
    assert max_train_step(snap) == stopped  # it stopped right after the step it was in
    assert stopped in finalised_steps(snap) and max(finalised_steps(snap)) == stopped
    assert (snap / "checkpoints" / str(stopped) / "state").is_dir()
    assert not [p for p in (snap / "checkpoints").iterdir() if TMP_SUFFIX in p.name]
    assert "final evaluation" not in out  # no final eval or sample for an interrupted run

    out2 = runner.run(workdir)
    assert resumed_step(out2) == stopped
    records = read_records(workdir)
    assert max_train_step(workdir) == STEPS
    assert_same_numbers(records, reference[1])


def test_half_written_checkpoint_is_not_the_latest(runner, reference, sigtermed):
    """A crash during a save leaves orbax's temporary directory; resume ignores it."""
    workdir = runner.root / "half-written"
    shutil.copytree(sigtermed["snapshot"], workdir)
    good = max(finalised_steps(workdir))
    half = (good // 5 + 1) * 5  # the next save the run would have made
    # What a save killed midway leaves: the step's files under the temporary name, some of
    # them missing (no commit markers, no array data).
    tmp = workdir / "checkpoints" / f"{half}{TMP_SUFFIX}"
    shutil.copytree(workdir / "checkpoints" / str(good), tmp)
    for marker in tmp.rglob("commit_success.txt"):
        marker.unlink()
    shutil.rmtree(tmp / "state" / "d", ignore_errors=True)
    for f in (tmp / "state").glob("ocdbt.process_*"):
        shutil.rmtree(f)

    ckpt = Checkpointer(workdir)
    try:
        assert ckpt.latest_step() == good
        assert half not in ckpt.all_steps()
    finally:
        ckpt.close()

    out = runner.run(workdir)
    assert resumed_step(out) == good
    assert max_train_step(workdir) == STEPS
    records = read_records(workdir)
    assert_same_numbers(records, reference[1])
    assert finalised_steps(workdir) == [20, 25, 30]
    assert not [p for p in (workdir / "checkpoints").iterdir() if TMP_SUFFIX in p.name]


# ----------------------------------------------------------------------------- metrics files


def test_metrics_jsonl_and_tensorboard(reference):
    workdir, records, _ = reference
    keys = set().union(*records)
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu",
                "eval/loss", "eval/perplexity"):
        assert key in keys, key
    evals = last_per_step(records, "eval/loss")
    assert sorted(evals) == [10, 20, 30]  # eval.every=10, and at the end
    for step, loss in evals.items():
        assert last_per_step(records, "eval/perplexity")[step] == pytest.approx(math.exp(loss), rel=1e-6)
    lr = last_per_step(records, "train/lr")  # the rate the step used: warmup 3 steps to 1e-3, cosine down
    assert lr[1] == pytest.approx(1e-3 / 4, rel=1e-6)  # lr * (0 + 1) / (warmup + 1): the first update moves
    assert lr[4] == pytest.approx(1e-3, rel=1e-6)
    assert all(lr[s + 1] <= lr[s] for s in range(4, STEPS))
    assert lr[STEPS] < 2e-4
    for key in ("train/tokens_per_sec", "train/mfu", "train/grad_norm"):
        assert all(v > 0 and math.isfinite(v) for v in last_per_step(records, key).values()), key

    tb = read_tb_scalars(workdir / "tb")
    for key in ("train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/perplexity"):
        want = last_per_step(records, key)
        assert tb[key].keys() == want.keys(), key
        for step, value in want.items():
            assert tb[key][step] == np.float32(value), (key, step)  # TensorBoard stores float32


# ----------------------------------------------------------------------------- another mesh


def expected_shard_shape(shape, names, mesh) -> tuple[int, ...]:
    rules = dict(RULES)
    out = []
    for dim, name in zip(shape, names):
        axes = rules.get(name) if name is not None else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        out.append(dim // math.prod(mesh.shape[a] for a in axes))
    return tuple(out)


@pytest.fixture(scope="module")
def trained_in_process(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mesh") / "run"
    cfg = tiny_config(steps=4, log_every=1, progress=False)
    cfg.model.vocab_size = 264  # the byte tokenizer's 259, rounded up to divide the tensor axis
    cfg.data.source, cfg.data.max_chars, cfg.data.tokenizer.kind = "stdlib", 20_000, "byte"
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
    cfg.checkpoint.every, cfg.eval.every, cfg.eval.batches = 4, 0, 2
    cfg.sample.max_new_tokens = 2
    summary = train(cfg, workdir)
    assert summary["step"] == 4
    return workdir, summary


@pytest.mark.parametrize("shape", [(1, 2, 4), (2, 2, 2)])
def test_restore_onto_another_mesh(trained_in_process, shape):
    workdir, summary = trained_in_process
    src_mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    dst_mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
    src = Run.open(workdir, mesh=src_mesh).restore()
    dst_run = Run.open(workdir, mesh=dst_mesh)
    dst = dst_run.restore()
    assert int(dst["step"]) == 4

    # Logical names of every parameter, from the model definition.
    from flax import nnx

    make_model = dst_run.make_model
    _, abstract_params = nnx.split(nnx.eval_shape(make_model), nnx.Param)
    names = {jax.tree_util.keystr(p): v.get_metadata()["out_sharding"]
             for p, v in jax.tree_util.tree_leaves_with_path(
                 abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))}

    src_leaves = dict((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(src["params"]))
    dst_leaves = jax.tree_util.tree_leaves_with_path(dst["params"])
    assert len(dst_leaves) == len(src_leaves) == len(names)
    sharded = 0
    for path, x in dst_leaves:
        key = jax.tree_util.keystr(path)
        full = np.asarray(src_leaves[key])
        np.testing.assert_array_equal(np.asarray(x), full, err_msg=key)
        logical = names[key.removesuffix(".value")]
        want = expected_shard_shape(x.shape, logical, dst_mesh)
        shards = x.addressable_shards
        assert len(shards) == dst_mesh.size
        for shard in shards:
            assert shard.data.shape == want, (key, logical, shard.data.shape, want)
            np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
        sharded += want != x.shape
    assert sharded >= 8  # embedding, attention and MLP weights are split, not replicated
    embed = jax.tree.leaves(dst["params"]["embed"])[0]
    assert embed.shape == (264, 64)
    assert embed.addressable_shards[0].data.shape == (264 // dst_mesh.shape["tensor"], 64 // dst_mesh.shape["fsdp"])
    # Optimizer moments are laid out like their parameters, and equal too.
    for a, b in zip(jax.tree.leaves(src["opt_state"]), jax.tree.leaves(dst["opt_state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # The same held-out loss on either mesh, and as training measured it at the end.
    cfg_dst = load_saved_config(workdir)
    cfg_dst.mesh.data, cfg_dst.mesh.fsdp, cfg_dst.mesh.tensor = shape
    on_src = evaluate(load_saved_config(workdir), workdir)
    on_dst = evaluate(cfg_dst, workdir)
    assert on_src["step"] == on_dst["step"] == 4
    assert abs(on_src["loss"] - on_dst["loss"]) <= 1e-5
    assert abs(on_src["loss"] - summary["eval"]["loss"]) <= 1e-5
