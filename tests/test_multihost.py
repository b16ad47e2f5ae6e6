"""Jobs of several processes: deciding the job from flags and SLURM, each process's batch rows,
and two CPU processes on localhost training like one process and resuming exactly after SIGKILL.

The two-process runs are ``python -m lmstack.cli train tiny --coordinator localhost:PORT
--num-processes 2 --process-id I`` with one CPU device each (gloo collectives, jax's CPU
default); the reference is one process with two CPU devices. Both run the same global program
on the same ``fsdp=2`` mesh, parameters and optimizer state split over the two devices, so the
only difference is the transport of the collectives (gloo between processes, memory within
one); each reduction adds two operands and a + b == b + a in IEEE arithmetic, so fp32 losses
must agree exactly, not within a tolerance.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lmstack.config import ConfigError
from lmstack.data.pipeline import TokenStream, train_iterator, transformed_windows_iterator
from lmstack.data.sources import DataError
from lmstack.distributed import first_slurm_host, global_batch, process_info, process_rows
from lmstack.sharding import batch_sharding, make_mesh

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
COMPARED = ("train/loss", "train/grad_norm", "train/accuracy", "eval/loss")

TINY_EXPERIMENT = f'''"""A tiny byte-level model on 20k characters of the standard library (tests only)."""

from lmstack.configs.base import base_config


def get_config(arg=None):
    c = base_config()
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff = 32, 2, 4, 64
    c.model.dtype = "float32"
    c.model.dropout = 0.1  # the per-step RNG must continue across processes and resumes too
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
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # parameters split over the processes' devices
    c.checkpoint.every = 4
    c.eval.every = 6
    c.eval.batches = 2
    c.sample.max_new_tokens = 4
    return c
'''


# ----------------------------------------------------------------------------- deciding the job


def flags(coordinator=None, num_processes=None, process_id=None) -> SimpleNamespace:
    return SimpleNamespace(coordinator=coordinator, num_processes=num_processes, process_id=process_id)


SLURM = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "81234",
         "SLURM_STEP_NODELIST": "gpu[007-008],cpu1", "SLURM_STEP_NUM_NODES": "2"}


def test_single_process_without_flags_or_slurm():
    info = process_info(flags(), {})
    assert (info.source, info.num_processes, info.process_id, info.multi_process) == ("single", 1, 0, False)
    assert process_info(flags(), {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).source == "single"  # one task


def test_flags_give_the_job():
    info = process_info(flags("host0:1234", 4, 2), {**SLURM})  # flags win over SLURM
    assert (info.source, info.coordinator, info.num_processes, info.process_id) == ("flags", "host0:1234", 4, 2)
    assert info.local_device_ids is None
    auto = process_info(flags("auto"), {})
    assert (auto.source, auto.coordinator, auto.num_processes, auto.process_id) == ("auto", None, None, None)


@pytest.mark.parametrize("given, message", [
    ((None, 2, None), "--num-processes 2 needs --coordinator and --process-id too: pass all of"),
    (("h:1", None, 0), "--coordinator h:1 --process-id 0 needs --num-processes too"),
    ((None, None, 0), "--process-id 0 needs --coordinator and --num-processes too"),
    (("h:1", 2, 2), "--process-id=2: must be in [0, 2) for --num-processes=2"),
    (("h:1", 0, 0), "--num-processes=0: must be at least 1"),
    (("h", 2, 0), "--coordinator='h': expected HOST:PORT (e.g. localhost:12345)"),
])
def test_half_set_flags_are_one_line_errors(given, message):
    with pytest.raises(ConfigError) as e:
        process_info(flags(*given), {})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_slurm_environment_gives_the_job():
    info = process_info(flags(), SLURM)
    # jax's SlurmCluster rule: the first host of the step, port 61440 + job id % 4096
    assert info.source == "slurm"
    assert info.coordinator == f"gpu007:{61440 + 81234 % 4096}"
    assert (info.num_processes, info.process_id) == (4, 3)
    assert info.local_device_ids == (1,)  # 2 tasks per node: one accelerator each
    one_per_node = process_info(flags(), {**SLURM, "SLURM_STEP_NUM_NODES": "4"})
    assert one_per_node.local_device_ids is None  # each task sees all of its node's devices


@pytest.mark.parametrize("drop, message", [
    (("SLURM_PROCID",), "SLURM_NTASKS=4 but SLURM_PROCID is not set: launch each task with srun"),
    (("SLURM_STEP_NODELIST",), "SLURM_NTASKS=4 but SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) is not set"),
    (("SLURM_PROCID", "SLURM_JOB_ID"), "SLURM_NTASKS=4 but SLURM_PROCID, SLURM_JOB_ID are not set"),
    (("SLURM_LOCALID",), "SLURM_NTASKS=4 on 2 node(s) but SLURM_LOCALID is not set"),
])
def test_half_set_slurm_environment_is_a_one_line_error(drop, message):
    env = {k: v for k, v in SLURM.items() if k not in drop}
    with pytest.raises(ConfigError) as e:
        process_info(flags(), env)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_slurm_values_out_of_range():
    with pytest.raises(ConfigError, match=r"SLURM_PROCID=4: must be in \[0, 4\) for SLURM_NTASKS=4"):
        process_info(flags(), {**SLURM, "SLURM_PROCID": "4"})
    with pytest.raises(ConfigError, match=r"SLURM_NTASKS='x': not an integer"):
        process_info(flags(), {**SLURM, "SLURM_NTASKS": "x"})


@pytest.mark.parametrize("nodelist, host", [
    ("node001", "node001"), ("node001,host2", "node001"), ("node[001-0015],host2", "node001"),
    ("node[001,007-015],host2", "node001"), ("a-b[3]", "a-b3"),
])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host  # the forms jax's SlurmCluster documents


# ----------------------------------------------------------------------------- each process's rows


def test_row_shares_rebuild_the_whole_batch():
    """Each process's rows (any split) are exactly those rows of the whole batch, for plain and
    transformed windows; a later batch too, so the iterator state means the same on every process."""
    rng = np.random.default_rng(0)
    stream = TokenStream(rng.integers(0, 200, 500).astype(np.int32), np.array([0, 100, 333]))

    def noise(window, r):  # a per-window random transform, like the denoising objectives'
        return {"tokens": window["tokens"] + r.integers(0, 5, window["tokens"].shape).astype(np.int32),
                "segment_ids": window["segment_ids"]}

    makers = [lambda rows: train_iterator(stream, seq_len=16, batch_size=8, seed=3, rows=rows),
              lambda rows: transformed_windows_iterator(stream, window_length=12, batch_size=8, seed=3,
                                                        transform=noise, rows=rows)]
    for make in makers:
        whole = make(None)
        shares = [make(slice(0, 2)), make(slice(2, 6)), make(slice(6, 8))]
        for _ in range(2):
            want = next(whole)
            parts = [next(it) for it in shares]
            for key in want:
                np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key], err_msg=key)
    with pytest.raises(DataError, match=r"rows 6:10 of a batch of train.batch_size=8: out of range"):
        train_iterator(stream, seq_len=16, batch_size=8, seed=3, rows=slice(6, 10))


def test_global_batch_in_one_process():
    """One process holds every row: the whole batch goes in as is, split over the data axes."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharding = batch_sharding(mesh)
    assert process_rows(sharding, 8) == slice(0, 8)
    batch = {"tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5), "weight": np.arange(8.0)}
    out = global_batch(batch, sharding)
    for key, value in batch.items():
        np.testing.assert_array_equal(np.asarray(out[key]), value)
        assert out[key].sharding.spec[0] == ("data", "fsdp")
        assert {s.data.shape[0] for s in out[key].addressable_shards} == {2}
    with pytest.raises(ConfigError, match=r"batch entry 'tokens' has 3 rows: expected the global batch of 8"):
        global_batch({"tokens": batch["tokens"][:3]}, sharding, 8)


# ----------------------------------------------------------------------------- two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def finalised_steps(workdir: Path) -> list[int]:
    """Checkpoints orbax has finished (a save in progress has a temporary name)."""
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def read_records(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def per_step(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r}


class Launcher:
    """``lmstack train tiny`` as one process with two CPU devices, or as two processes with one each."""

    def __init__(self, root: Path):
        (root / "experiments").mkdir()
        (root / "experiments" / "tiny.py").write_text(TINY_EXPERIMENT)
        self.root, self.n = root, 0
        self.env = {**os.environ, "LMSTACK_EXPERIMENTS": str(root / "experiments"), "PYTHONUNBUFFERED": "1",
                    "JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"),  # the resumed run compiles nothing
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

    def start(self, workdir: Path, processes: int) -> list[tuple[subprocess.Popen, Path]]:
        env = {**self.env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={2 // processes}"}
        cmd = [sys.executable, "-m", "lmstack.cli", "train", "tiny", "--workdir", str(workdir)]
        port = free_port()
        procs = []
        for i in range(processes):
            self.n += 1
            log = self.root / f"run{self.n}.log"
            extra = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]
            with open(log, "w") as f:
                procs.append((subprocess.Popen(cmd + (extra if processes > 1 else []), stdout=f,
                                               stderr=subprocess.STDOUT, env=env, cwd=REPO), log))
        return procs

    def run(self, workdir: Path, processes: int) -> list[str]:
        procs = self.start(workdir, processes)
        outputs = []
        try:
            for proc, log in procs:
                rc = proc.wait(timeout=600)
                outputs.append(log.read_text())
                assert rc == 0, outputs[-1]
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
        return outputs


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> Launcher:
    return Launcher(tmp_path_factory.mktemp("multihost"))


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_exactly_after_sigkill(launcher):
    reference = launcher.root / "one-process"
    launcher.run(reference, 1)
    want = read_records(reference)
    assert sorted(per_step(want, "train/loss")) == list(range(1, STEPS + 1))

    # Two processes, both SIGKILLed once a checkpoint is finalised (saves are asynchronous)
    # and a later step is logged.
    workdir = launcher.root / "two-processes"
    procs = launcher.start(workdir, 2)
    deadline = time.monotonic() + 600
    try:
        while all(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
            saved = finalised_steps(workdir)
            if saved and max(per_step(read_records(workdir), "train/loss"), default=0) > max(saved):
                break
            time.sleep(0.002)
    finally:
        for proc, _ in procs:
            proc.send_signal(signal.SIGKILL)
        codes = [proc.wait() for proc, _ in procs]
    killed = read_records(workdir)
    killed_at = max(per_step(killed, "train/loss"), default=0)
    saved = finalised_steps(workdir)
    assert codes == [-signal.SIGKILL] * 2 and saved and max(saved) < killed_at < STEPS, procs[0][1].read_text()
    # Every process wrote its own shards and its own data-iterator position into the checkpoint.
    last = workdir / "checkpoints" / str(max(saved))
    assert sorted(p.name for p in (last / "data").glob("process_*")) == ["process_0-of-2.json",
                                                                         "process_1-of-2.json"]
    assert sorted(p.name for p in (last / "state").glob("ocdbt.process_*")) == ["ocdbt.process_0",
                                                                                  "ocdbt.process_1"]

    primary, secondary = launcher.run(workdir, 2)
    assert f"resumed from {(workdir / 'checkpoints').resolve()} at step {max(saved)}" in primary
    assert "final evaluation at step 12" in primary
    assert "resumed from" not in secondary and "final evaluation" not in secondary  # process 1 prints nothing
    records = read_records(workdir)
    resumed = [r["step"] for r in records[len(killed):] if "train/loss" in r]
    assert resumed == list(range(max(saved) + 1, STEPS + 1))  # logged once, by process 0 only
    # Killed and resumed records alike equal the one-process run exactly (see the module docstring).
    for key in COMPARED:
        ref = per_step(want, key)
        for r in records:
            if key in r:
                assert r[key] == ref[r["step"]], (key, r["step"], r[key], ref[r["step"]])
    assert per_step(records, "eval/loss").keys() == per_step(want, "eval/loss").keys() == {6, 12}
