"""``lmstack eval``: run the evaluators on a saved checkpoint, never touching training state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc

from lmstack.distributed import global_batch, is_primary
from lmstack.evals.base import EvalContext, run_evaluators
from lmstack.run import Run


def evaluate(cfg: mlc.ConfigDict, workdir: str | Path, step: int | None = None) -> dict[str, Any]:
    """Held-out metrics of the checkpoint at ``step`` (default: the latest); also written to
    ``WORKDIR/eval/step_N.json``."""
    run = Run.open(workdir, cfg)
    data = run.load_data()
    state = run.restore(step)
    eval_fn, bsh = run.eval_step(), run.batch_sharding
    with jax.set_mesh(run.mesh):
        ctx = EvalContext(
            cfg=cfg, data=data, objective=run.objective, batches=run.objective.eval_batches(data),
            loss_sums=lambda b: eval_fn(state, global_batch(b, bsh)),
            model=lambda: run.model(state),
        )
        results = run_evaluators(ctx)
    out = {"step": int(state["step"]), **results}
    if is_primary():
        (run.workdir / "eval").mkdir(exist_ok=True)
        (run.workdir / "eval" / f"step_{out['step']}.json").write_text(json.dumps(out, indent=1))
    return out
