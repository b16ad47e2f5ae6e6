"""``lmstack eval``: run the evaluators on saved checkpoints (the latest, one step, every
step, or each step as a running job saves it), never touching training state.

Each evaluated step becomes one line of ``WORKDIR/eval/results.jsonl``
(``{"step": N, metric: value, ..., "time": unix seconds, "config_digest": ...}``) and
TensorBoard scalars ``eval/METRIC`` at step N under ``WORKDIR/eval/tb``. That file is also
the record of what is done: ``--step all`` and ``--watch`` skip the steps it already holds
under the same settings (``config_digest``), so a restarted watcher carries on where it
stopped and a change of evaluators evaluates again. Only finished checkpoints are read:
orbax saves into a temporary directory and renames it when complete, and lists no save in
progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import ml_collections as mlc

from lmstack.checkpoint import Checkpointer
from lmstack.config import ConfigError
from lmstack.distributed import global_batch, is_primary
from lmstack.evals.base import EvalContext, run_evaluators
from lmstack.init_from import parse_init_from
from lmstack.metrics_log import MetricsWriter
from lmstack.run import Run
from lmstack.runspec import SPEC_FILE

RESULTS = "results.jsonl"
POLL_SECONDS = 30.0
TIMEOUT_SECONDS = 3600.0
_NOT_MEASURED = ("mesh", "log", "checkpoint")  # config sections that do not change what a metric means


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_run_dir(workdir: str | Path) -> Path:
    """``workdir`` as a Path; ConfigError saying what it lacks unless it holds a run
    (``config.json`` and ``run_spec.json``, written by ``lmstack train`` before its first step)."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ConfigError(f"workdir {str(workdir)!r} does not exist: pass the --workdir given to `lmstack train` "
                          f"(or `lmstack import`)")
    missing = [name for name in ("config.json", SPEC_FILE) if not (workdir / name).is_file()]
    if missing:
        raise ConfigError(f"workdir {str(workdir)!r} is not a run (no {' and no '.join(missing)}): pass the --workdir "
                          f"given to `lmstack train` (or `lmstack import`); a starting run writes them before step 1")
    return workdir


def check_eval_flags(step: str | None, watch: bool, poll_seconds: float | None,
                     timeout_seconds: float | None) -> tuple[int | str | None, float, float]:
    """``lmstack eval``'s flags checked together: (the step: None for the latest, an int or
    ``"all"``; the poll interval; the timeout). ConfigError naming the flag otherwise."""
    if step is not None and step != "all":
        try:
            step = int(step)
        except ValueError:
            raise ConfigError(f"--step={step!r}: not a checkpoint step: pass a step number, 'all' for every saved "
                              f"step, or leave it out for the latest") from None
    if watch and step is not None:
        raise ConfigError(f"--watch evaluates every checkpoint as it is saved: leave out --step={step}")
    for flag, value in (("--poll-seconds", poll_seconds), ("--timeout-seconds", timeout_seconds)):
        if value is not None and not watch:
            raise ConfigError(f"{flag} applies only with --watch: add --watch or leave out {flag}")
        if value is not None and not value > 0:
            raise ConfigError(f"{flag}={value}: must be > 0 seconds")
    return step, poll_seconds or POLL_SECONDS, timeout_seconds or TIMEOUT_SECONDS


def config_digest(cfg: mlc.ConfigDict) -> str:
    """12 hex digits naming the settings a result was measured with: the whole config but
    the sections that change how, not what, is computed (mesh, log, checkpoint)."""
    measured = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_MEASURED}
    return hashlib.sha256(json.dumps(measured, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_results(workdir: str | Path) -> list[dict[str, Any]]:
    """Every record of ``WORKDIR/eval/results.jsonl`` in order (a line cut short by a killed
    writer is not a record)."""
    path = Path(workdir) / "eval" / RESULTS
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


class CheckpointEvaluator:
    """A run opened once for evaluation (config, data, compiled eval step, read-only
    checkpoint manager); each step's state is restored into it and evaluated. Use as a
    context manager, or call :meth:`close`."""

    def __init__(self, cfg: mlc.ConfigDict, workdir: str | Path):
        self.run = Run.open(check_run_dir(workdir), cfg)
        self.cfg = self.run.cfg
        self.data = self.run.load_data()
        self.batches = self.run.objective.eval_batches(self.data)
        self.eval_fn = self.run.eval_step()
        self.digest = config_digest(self.cfg)
        self.results_path = self.run.workdir / "eval" / RESULTS
        self._ckpt = Checkpointer(self.run.workdir, read_only=True)
        self.directory = self._ckpt.directory  # WORKDIR/checkpoints
        self._done = {r["step"] for r in read_results(self.run.workdir) if r.get("config_digest") == self.digest}
        self._results = None
        self._tb = None

    def steps(self) -> list[int]:
        """The finished checkpoint steps now on disk, in order."""
        return self._ckpt.reload()

    def done(self) -> set[int]:
        """The steps ``results.jsonl`` holds under this evaluator's settings."""
        return set(self._done)

    def imported(self) -> bool:
        """A workdir made by ``lmstack import``: its weights come from ``init.from``, no checkpoint."""
        return bool(self.run.spec.lineage.get("imported"))

    def evaluate(self, step: int | None = None) -> dict[str, Any]:
        """Restore ``step`` (default: the latest finished one) and run ``config.eval.names`` on
        it; the record ``{"step", metrics..., "time", "config_digest"}`` is appended to
        ``results.jsonl`` and written to TensorBoard. FileNotFoundError when the step has no
        finished checkpoint (naming those that have)."""
        steps = self.steps()
        if step is None and not steps and parse_init_from(self.cfg.init["from"]).kind != "scratch":
            state = self.run.restore(None)  # an imported workdir: the weights init.from gives
            step = int(state["step"])
        elif step is None and not steps:
            raise FileNotFoundError(
                f"no finished checkpoint in {self.directory} yet: wait for `lmstack train` to save one (every "
                f"checkpoint.every={self.cfg.checkpoint.every} steps), or pass --watch to evaluate each as it is saved")
        else:
            step = steps[-1] if step is None else step
            if step not in steps:
                raise FileNotFoundError(
                    f"no checkpoint for step {step} in {self.directory} (have: {', '.join(map(str, steps))}): "
                    f"pass --step with one of those, 'all', or leave it out for the latest")
            state = self.run.restore_checkpoint(self._ckpt, step)
        run, bsh = self.run, self.run.batch_sharding
        with jax.set_mesh(run.mesh):
            ctx = EvalContext(
                cfg=self.cfg, data=self.data, objective=run.objective, batches=self.batches,
                loss_sums=lambda b: self.eval_fn(state, global_batch(b, bsh)),
                model=lambda: run.model(state), run=run,
            )
            metrics = run_evaluators(ctx)
        record = {"step": step, **metrics, "time": round(time.time(), 3), "config_digest": self.digest}
        if is_primary():  # every process evaluates (the batches are global arrays); one writes
            self._write(record)
        return record

    def _write(self, record: dict[str, Any]) -> None:
        if self._results is None:
            self.results_path.parent.mkdir(exist_ok=True)
            if self.results_path.is_file():  # drop a line cut short by a killed writer before appending
                text = self.results_path.read_bytes()
                os.truncate(self.results_path, text.rfind(b"\n") + 1)
            self._results = open(self.results_path, "a", buffering=1)
            self._tb = MetricsWriter(self.results_path.parent, jsonl=False, tensorboard=self.cfg.log.tensorboard)
        self._results.write(json.dumps(record) + "\n")
        metrics = {k: v for k, v in record.items() if k not in ("step", "time", "config_digest")}
        self._tb.write(record["step"], metrics, prefix="eval")
        self._tb.flush()
        self._done.add(record["step"])

    def close(self) -> None:
        self._ckpt.close()
        if self._results is not None:
            self._results.close()
            self._tb.close()

    def __enter__(self) -> "CheckpointEvaluator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def evaluate(cfg: mlc.ConfigDict, workdir: str | Path, step: int | None = None) -> dict[str, Any]:
    """Held-out metrics of the checkpoint at ``step`` (default: the latest), evaluated even if
    ``results.jsonl`` holds it already; the record is appended there (see the module docstring)."""
    with CheckpointEvaluator(cfg, workdir) as ev:
        return ev.evaluate(step)


def evaluate_all(cfg: mlc.ConfigDict, workdir: str | Path) -> Iterator[dict[str, Any]]:
    """Every finished checkpoint not yet in ``results.jsonl`` under these settings, in step
    order, restoring each into one opened run; yields each record once written."""
    with CheckpointEvaluator(cfg, workdir) as ev:
        steps = ev.steps()
        skipped = [s for s in steps if s in ev.done()]
        if skipped:
            _say(f"steps {', '.join(map(str, skipped))}: already in {ev.results_path}, skipped")
        if not steps:
            _say(f"no finished checkpoint in {ev.directory} yet")
        for step in steps:
            if step not in skipped:
                yield ev.evaluate(step)


def watch(cfg: mlc.ConfigDict, workdir: str | Path, *, poll_seconds: float = POLL_SECONDS,
          timeout_seconds: float = TIMEOUT_SECONDS) -> Iterator[dict[str, Any]]:
    """Evaluate each finished checkpoint of a (running) job exactly once, in step order, those
    saved already first; look for new ones every ``poll_seconds``. Stops once the final step
    (``train.steps``) is evaluated, or after ``timeout_seconds`` without a new checkpoint.
    Steps in ``results.jsonl`` under these settings are skipped, so a restart evaluates only
    what is new. Yields each record once written; ConfigError for an imported workdir."""
    with CheckpointEvaluator(cfg, workdir) as ev:
        if ev.imported():
            raise ConfigError(f"workdir {str(workdir)!r} holds a model made by `lmstack import`: it saves no "
                              f"checkpoints to watch; evaluate it without --watch")
        final = ev.cfg.train.steps
        _say(f"watching {ev.directory} every {poll_seconds:g}s until step {final} "
             f"or {timeout_seconds:g}s without a new checkpoint")
        last_new = time.monotonic()
        while final not in ev.done():
            pending = [s for s in ev.steps() if s not in ev.done()]
            for step in pending:
                if step not in ev.steps():  # deleted by the run's checkpoint.keep while we evaluated others
                    _say(f"step {step}: its checkpoint was deleted (checkpoint.keep) before it was evaluated")
                    continue
                yield ev.evaluate(step)
            if pending:
                last_new = time.monotonic()
                continue
            waited = time.monotonic() - last_new
            if waited >= timeout_seconds:
                _say(f"no new checkpoint within --timeout-seconds={timeout_seconds:g}: stopped before step {final} "
                     f"(train.steps)")
                return
            time.sleep(min(poll_seconds, timeout_seconds - waited))
        _say(f"step {final} (train.steps) is evaluated: done")
