"""The training loop: init or resume, the compiled step, logging, evaluation, checkpoints.

Nothing here knows what the model or the objective is; both come from the registry by the
names in the config. Re-running the same command in a workdir that holds a checkpoint
resumes from it exactly: the state, the data iterator's position and the per-step RNG
(``fold_in(seed, step)``, drawn in the step) all continue where they stopped.
"""

from __future__ import annotations

import math
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
from flax import nnx
from tqdm import tqdm

from lmstack.checkpoint import Checkpointer
from lmstack.distributed import any_process, fetch, global_batch, is_primary
from lmstack.evals.base import EvalContext, run_evaluators
from lmstack.metrics_log import MetricsWriter
from lmstack.perf import mfu, peak_flops
from lmstack.run import Run, RunData
from lmstack.sample import continue_text, encode_prompt
from lmstack.trainstate import param_count, trainable_count


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps, saves and exits cleanly. In a
    job of several processes they stop together, after the same step, if any was signalled."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.stopping = False
        self._previous: dict[int, Any] = {}

    def check(self) -> bool:
        self.stopping = any_process(self.signal is not None)
        return self.stopping

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._set)
        return self

    def _set(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _say(msg: str) -> None:
    if is_primary():
        tqdm.write(msg, file=sys.stdout)


def train(cfg: mlc.ConfigDict, workdir: str | Path, *, accept_changed_data: bool = False) -> dict[str, Any]:
    """Train ``cfg`` in ``workdir`` (resuming if it holds a checkpoint); returns a summary.

    ``accept_changed_data`` resumes even though the data's token stream differs from the one
    the run started on (otherwise a ConfigError)."""
    workdir = Path(workdir)
    run, data = Run.for_training(cfg, workdir, accept_changed_data=accept_changed_data)
    cfg = run.cfg
    mesh, objective, abstract, bsh = run.mesh, run.objective, run.abstract, run.batch_sharding
    ckpt = Checkpointer(workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    train_iter = objective.train_batches(data)
    if ckpt.latest_step() is not None:
        state = run.restore_checkpoint(ckpt, None, train_iter)
        _say(f"resumed from {ckpt.directory} at step {int(state['step'])}")
    else:
        state = run.starting_state()
    _say("\n".join([run.describe(param_count(abstract), trainable_count(abstract), len(data.train)),
                    *(f"  {n}" for n in data.notes)]))

    step_fn = run.train_step()
    eval_fn = run.eval_step()
    val_batches = objective.eval_batches(data)
    primary = is_primary()
    writer = MetricsWriter(workdir, jsonl=cfg.log.jsonl and primary, tensorboard=cfg.log.tensorboard and primary)
    config_json = cfg.to_dict()
    fpt = run.model_cfg.flops_per_token(cfg.data.seq_len)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    seed_key = run.seed_key()
    in_process_collectives = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"

    def run_eval(step: int) -> dict[str, float]:
        with jax.set_mesh(mesh):
            ctx = EvalContext(
                cfg=cfg, data=data, objective=objective, batches=val_batches,
                loss_sums=lambda b: eval_fn(state, global_batch(b, bsh)),
                model=lambda: run.model(state), run=run,
            )
            results = run_evaluators(ctx)
        if results:
            writer.write(step, results, prefix="eval")
            _say(f"step {step}: " + "  ".join(f"eval/{k} {v:.4f}" for k, v in results.items()))
        return results

    start = int(state["step"])
    summary: dict[str, Any] = {"start_step": start, "params": param_count(abstract),
                               "trainable_params": trainable_count(abstract)}
    step_times: list[float] = []
    compile_s = None
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not (cfg.train.progress and primary), unit="step",
               dynamic_ncols=True, file=sys.stderr)
    step = start
    peak_flops(cfg.model.dtype)  # on CPU a measured matmul rate: taken now, while no step runs beside it
    try:
        with _StopFlag() as stop, jax.set_mesh(mesh):
            last_t, last_step = time.perf_counter(), start
            while step < cfg.train.steps and not stop.stopping:
                batch = global_batch(next(train_iter), bsh, cfg.train.batch_size)
                batch, collected = run.collect(state, batch, step)
                state, metrics = step_fn(state, batch, seed_key)
                if in_process_collectives:  # see lmstack.cpu_defaults: XLA:CPU hangs with many queued
                    jax.block_until_ready(metrics)
                step += 1
                bar.update(1)
                if step % cfg.train.log_every == 0 or step == cfg.train.steps or step == start + 1:
                    metrics = {k: float(v) for k, v in jax.device_get({**metrics, **collected}).items()}
                    now = time.perf_counter()
                    per_step = (now - last_t) / (step - last_step)
                    if compile_s is None:
                        compile_s = now - last_t
                    else:
                        step_times.append(per_step)
                    last_t, last_step = now, step
                    tps = tokens_per_step / per_step
                    metrics.update(tokens_per_sec=tps, mfu=mfu(fpt, tps, cfg.model.dtype))
                    writer.write(step, metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
                    if not math.isfinite(metrics["loss"]):
                        _say(f"step {step}: loss is {metrics['loss']}; the update was skipped")
                if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
                    run_eval(step)
                    last_t = time.perf_counter()  # evaluation time is not training throughput
                if stop.check() or step % cfg.checkpoint.every == 0 or step == cfg.train.steps:
                    ckpt.save(step, run.checkpoint_state(state), train_iter, config_json)
            if stop.stopping:
                ckpt.wait()
                _say(f"received signal {stop.signal or 'SIGTERM/SIGINT on another process'}: saved a checkpoint at step {step} in {ckpt.directory}; "
                     f"re-run the same command to resume")
                summary.update(step=step, interrupted=True)
                return summary
        eval_results = run_eval(step)
    finally:
        bar.close()
        ckpt.close()  # waits for in-flight saves: they hold good state
        writer.close()
    summary.update(
        step=step,
        compile_s=compile_s,
        ms_per_step=1e3 * statistics.median(step_times) if step_times else None,
        tokens_per_sec=tokens_per_step / statistics.median(step_times) if step_times else None,
        eval=eval_results,
    )
    if eval_results:
        _say(f"final evaluation at step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in eval_results.items()))
    summary["sample"] = sample_text(run, state, data)
    if summary["sample"] is not None:
        _say("sample: " + summary["sample"])
    return summary


def sample_text(run: Run, state: dict, data: RunData) -> str | None:
    """A continuation of ``sample.prompt`` (default: the start of the validation text), for
    models that generate with a KV cache (decoders); None for the others."""
    cfg = run.cfg
    if not hasattr(run.model_cls, "init_cache"):
        return None
    tok = data.tokenizer
    source = data.val if len(data.val) else data.train
    ids = encode_prompt(tok, cfg.sample.prompt) if cfg.sample.prompt else [int(t) for t in source.tokens[:16]]
    model = nnx.merge(run.graphdef, fetch(state["params"]), fetch(state["frozen"]))
    s = cfg.sample
    return continue_text(model, tok, ids, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                         top_k=s.top_k, top_p=s.top_p, seed=s.seed)[0]
