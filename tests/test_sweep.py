"""Sweeps: the search-space helpers are deterministic and spread as documented, members are
named from their overrides and validated before anything launches, the three launchers'
dry runs show every member, and a real two-member local sweep runs, then skips both when
run again, and ``lmstack report`` compares them.
"""

from __future__ import annotations

import json
import math
import re
import shlex

import numpy as np
import pytest

from lmstack.cli import main
from lmstack.config import ConfigError
from lmstack.sweep import choice, grid, load_sweep, log_uniform, member_names, random, uniform

TINY = '''"""A tiny byte-level model on 20k characters of the standard library, over two seeds (tests only)."""

from lmstack.configs.base import base_config
from lmstack.sweep import grid


def get_config(arg=None):
    c = base_config()
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff = 32, 2, 4, 64
    c.data.source = "stdlib"
    c.data.max_chars = 20_000
    c.data.seq_len = 16
    c.data.tokenizer.kind = "byte"
    c.train.batch_size = 2
    c.train.steps = 3
    c.train.log_every = 1
    c.train.progress = False
    c.optimizer.warmup_steps = 1
    c.mesh.data = 1
    c.checkpoint.every = 3
    c.eval.every = 0
    c.eval.batches = 1
    c.log.tensorboard = False
    c.sample.max_new_tokens = 1
    return c


def sweep():
    # the seed is an input of the compiled programs, so the second member reuses the first's compiles
    return grid(**{"train.seed": [0, 1]})
'''

BAD = '''"""The base config, with a typo in its sweep's second member (tests only)."""

from lmstack.configs.base import base_config


def get_config(arg=None):
    return base_config()


def sweep():
    return [{"optimizer.lr": 1e-3}, {"optimizer.lrr": 1e-3}]
'''


@pytest.fixture
def experiments(tmp_path, monkeypatch):
    """A directory of test experiments on LMSTACK_EXPERIMENTS; the working directory is tmp_path."""
    exp = tmp_path / "experiments"
    exp.mkdir()
    (exp / "tiny.py").write_text(TINY)
    (exp / "bad.py").write_text(BAD)
    monkeypatch.setenv("LMSTACK_EXPERIMENTS", str(exp))
    monkeypatch.chdir(tmp_path)
    return exp


# ----------------------------------------------------------------------------- search spaces


def test_grid_is_the_product_in_order():
    assert grid(**{"optimizer.lr": [1e-3, 2e-3]}, model__dropout=[0.0, 0.1]) == [
        {"optimizer.lr": 1e-3, "model.dropout": 0.0}, {"optimizer.lr": 1e-3, "model.dropout": 0.1},
        {"optimizer.lr": 2e-3, "model.dropout": 0.0}, {"optimizer.lr": 2e-3, "model.dropout": 0.1}]
    assert grid({"--config.train.seed": [0, 1, 2]}) == [{"train.seed": s} for s in (0, 1, 2)]
    with pytest.raises(ConfigError, match=r"^grid axis 'optimizer.lr' is 0.001: give a non-empty list of values$"):
        grid(optimizer__lr=1e-3)


def test_random_is_deterministic_given_its_seed():
    space = {"optimizer.lr": log_uniform(1e-4, 1e-2), "model.dropout": uniform(0.0, 0.2),
             "train.batch_size": choice(8, 16, 32), "train.steps": 100}
    first = random(20, seed=3, **space)
    assert first == random(20, seed=3, **space)
    assert first != random(20, seed=4, **space)
    assert all(m["train.steps"] == 100 and m["train.batch_size"] in (8, 16, 32) for m in first)
    assert {m["train.batch_size"] for m in first} == {8, 16, 32}
    # draws keep 3 significant digits by default
    assert all(m["optimizer.lr"] == float(f"{m['optimizer.lr']:.3g}") for m in first)


def test_log_uniform_spreads_evenly_over_decades():
    draws = np.array([m["x"] for m in random(4000, seed=0, x=log_uniform(1e-5, 1e-1, digits=None))])
    assert draws.min() >= 1e-5 and draws.max() <= 1e-1
    per_decade = np.histogram(np.log10(draws), bins=4, range=(-5, -1))[0] / len(draws)
    # a binomial's 4 standard deviations at p=1/4, n=4000: 0.027
    np.testing.assert_allclose(per_decade, 0.25, atol=0.027)
    linear = np.array([m["x"] for m in random(4000, seed=0, x=uniform(1e-5, 1e-1, digits=None))])
    assert np.mean(linear < 1e-3) < 0.02  # what log_uniform is for: a uniform draw almost never goes low
    rounded = [m["x"] for m in random(500, seed=1, x=log_uniform(1.234e-4, 5e-4))]
    assert min(rounded) >= 1.234e-4 and max(rounded) <= 5e-4  # rounding stays inside the range
    with pytest.raises(ConfigError, match=r"^log_uniform\(0, 1\): needs 0 < lo < hi$"):
        log_uniform(0, 1)


def test_member_names():
    assert member_names([{"optimizer.lr": 1e-3, "train.steps": 200}, {"optimizer.lr": 3e-4, "train.steps": 200},
                         {"model.dropout": 0.1, "optimizer.dropout": 0.0}, {"eval.names": ("a b",)}, {}]) == [
        "lr=0.001,steps=200", "lr=0.0003,steps=200", "model.dropout=0.1,optimizer.dropout=0.0",
        "names=__a_b_,_", "base"]
    long = {f"model.key{i}": 0.123456 for i in range(8)}
    (name,) = member_names([long])
    assert re.fullmatch(r"key0=0\.123456,key1=0\.123456,key2=0\.123456,key3=0\.123456,key4-[0-9a-f]{8}", name)
    clash = member_names([{"data.path": "a/b"}, {"data.path": "a b"}])  # both sanitise to path=a_b
    assert clash[0] != clash[1] and all(re.fullmatch(r"path=a_b-[0-9a-f]{8}", n) for n in clash)
    with pytest.raises(ConfigError, match=r"^sweep members #0 and #2 have the same overrides"):
        member_names([{"train.seed": 0}, {"train.seed": 1}, {"train.seed": 0}])


# ----------------------------------------------------------------------------- validation and dry runs


def test_an_unknown_key_fails_before_anything_launches(experiments, tmp_path, capsys):
    assert main(["sweep", "bad"]) == 2
    assert capsys.readouterr().err == (
        "lmstack: error: sweep member 'lrr=0.001' (#1 of bad.py's sweep()): unknown config key 'optimizer.lrr' "
        "(from --config.optimizer.lrr=0.001): closest valid keys: optimizer.lr, optimizer.b2, optimizer.b1\n")
    assert not (tmp_path / "runs").exists()  # the valid first member did not start either
    assert main(["sweep", "tiny", "--config.train.seed=3"]) == 2
    assert capsys.readouterr().err == ("lmstack: error: sweep member 'seed=0' sets train.seed, which "
                                       "--config.train.seed=3 also sets: drop the flag or the axis\n")
    assert main(["sweep", "tiny", "--launcher", "tpu-vm"]) == 2
    assert capsys.readouterr().err == ("lmstack: error: --launcher tpu-vm needs --tpu-name and --zone: the TPU VM "
                                       "slice to run the members on\n")
    assert not (tmp_path / "runs").exists()


def test_dry_runs_show_every_member(experiments, tmp_path, capsys):
    common = "--config.optimizer.lr=0.002"
    assert main(["sweep", "tiny", "--dry-run", common]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"[{i + 1}/2] seed={i}: lmstack train tiny --workdir runs/tiny/seed={i} {common} --config.train.seed={i}"
        for i in range(2)]

    assert main(["sweep", "tiny", "--dry-run", "--launcher", "slurm", "--workdir", "sw", common]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-1\n" in script
    for i in range(2):
        assert f"  {i}) MEMBER=seed={i}; STEPS=3; ARGS=(--config.train.seed={i}) ;;\n" in script
    assert script.endswith(f'exec lmstack train tiny --workdir "$W" {common} "${{ARGS[@]}}"\n')

    assert main(["sweep", "tiny", "--dry-run", "--launcher", "tpu-vm", "--tpu-name", "v5e-16", "--zone", "us-west4-a",
                 common]) == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith("gcloud")]
    assert [line[:10] for line in lines] == [["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v5e-16", "--zone",
                                              "us-west4-a", "--worker=all", "--command"]] * 2
    assert [shlex.split(line[10]) for line in lines] == [
        ["lmstack", "train", "tiny", "--workdir", f"runs/tiny/seed={i}", common, f"--config.train.seed={i}",
         "--coordinator", "auto"] for i in range(2)]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sw").exists()  # a dry run writes nothing


def test_writing_the_slurm_script_records_each_members_overrides(experiments, tmp_path, capsys):
    assert main(["sweep", "tiny", "--launcher", "slurm"]) == 0
    assert capsys.readouterr().out == "wrote runs/tiny/sweep.sbatch (2 members): sbatch runs/tiny/sweep.sbatch\n"
    assert (tmp_path / "runs/tiny/sweep.sbatch").read_text().startswith("#!/bin/bash\n")
    for seed in (0, 1):
        record = json.loads((tmp_path / f"runs/tiny/seed={seed}/overrides.json").read_text())
        assert record == {"experiment": "tiny", "member": f"seed={seed}", "overrides": {"train.seed": seed},
                          "common": []}


def test_the_shakespeare_char_sweep_loads(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep("shakespeare_char:smoke=True")
    assert [m.name for m in sweep.members] == [f"lr={lr},dropout={d}" for lr in ("0.0005", "0.001", "0.002")
                                               for d in ("0.0", "0.1")]
    assert {m.steps for m in sweep.members} == {6}


# ----------------------------------------------------------------------------- a real local sweep


def test_a_member_that_fails_is_reported(experiments, tmp_path, capsys):
    # valid at load, the missing corpus fails in the member's own process, in seconds
    (experiments / "missing.py").write_text(TINY.replace('grid(**{"train.seed": [0, 1]})',
                                                         'grid(**{"data.path": ["missing.txt"]})')
                                            .replace('c.data.source = "stdlib"', 'c.data.source = "text"'))
    assert main(["sweep", "missing"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[1] == (
        "[1/1] path=missing.txt: FAILED (exit 2): lmstack: error: data.path: no such file or directory "
        "'missing.txt': pass --config.data.path=FILE (a txt file, a directory of .txt files, or a glob)")
    assert err == ("lmstack: error: 1 of 1 sweep members did not finish: path=missing.txt (each one's output is "
                   "in its train.log; re-run the sweep to resume them)\n")


@pytest.mark.slow  # two real trainings as subprocesses: ~50 CPU-seconds, mostly the first member's compiles
def test_a_local_sweep_runs_resumes_and_reports(experiments, tmp_path, monkeypatch, capsys):
    # the members share one persistent compilation cache, so the second reuses the first's programs
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax-cache"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    assert main(["sweep", "tiny"]) == 0, [p.read_text() for p in tmp_path.glob("runs/tiny/*/train.log")]
    out = capsys.readouterr().out
    assert re.fullmatch(r"\[1/2\] seed=0: running \(output in runs/tiny/seed=0/train.log\)\n"
                        r"\[1/2\] seed=0: done in [0-9.]+s\n"
                        r"\[2/2\] seed=1: running \(output in runs/tiny/seed=1/train.log\)\n"
                        r"\[2/2\] seed=1: done in [0-9.]+s\n", out), out
    runs = tmp_path / "runs" / "tiny"
    losses = {}
    for seed in (0, 1):
        w = runs / f"seed={seed}"
        assert json.loads((w / "config.json").read_text())["train"]["seed"] == seed
        assert json.loads((w / "overrides.json").read_text())["overrides"] == {"train.seed": seed}
        assert (w / "checkpoints" / "3").is_dir()
        records = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
        losses[seed] = [r["train/loss"] for r in records if "train/loss" in r]
        assert len(losses[seed]) == 3 and all(math.isfinite(v) for v in losses[seed])
    assert losses[0] != losses[1]  # each member trained with its own seed
    before = {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.jsonl")}

    assert main(["sweep", "tiny", "--parallel", "2"]) == 0
    assert capsys.readouterr().out == ("[1/2] seed=0: finished (checkpoint at step 3), skipped\n"
                                       "[2/2] seed=1: finished (checkpoint at step 3), skipped\n")
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.jsonl")} == before

    assert main(["report", str(runs), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["run"], r["config"], r["step"], r["tokens"]) for r in rows] == [
        (f"seed={s}", {"train.seed": s}, 3, 3 * 2 * 16) for s in (0, 1)]
    for row, seed in zip(rows, (0, 1)):
        assert row["metrics"]["train/loss"]["final"] == losses[seed][-1]
        assert row["metrics"]["train/loss"]["best"] == min(losses[seed])
    assert (runs / "report" / "train_loss.png").is_file()
