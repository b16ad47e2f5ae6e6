"""``lmstack eval``: run the evaluators on a saved checkpoint, never touching training state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
from flax import nnx

from lmstack import registry
from lmstack.evals.base import EvalContext, run_evaluators
from lmstack.run import build_mesh, load_data, restore_checkpoint
from lmstack.sharding import batch_sharding
from lmstack.step import compile_eval_step


def evaluate(cfg: mlc.ConfigDict, workdir: str | Path, step: int | None = None) -> dict[str, Any]:
    """Held-out metrics of the checkpoint at ``step`` (default: the latest); also written to
    ``WORKDIR/eval/step_N.json``."""
    workdir = Path(workdir)
    mesh = build_mesh(cfg)
    data = load_data(cfg, workdir)
    graphdef, state, shardings = restore_checkpoint(cfg, workdir, step, mesh)
    objective = registry.lookup("objective", cfg.objective.name, "objective.name")(cfg)
    bsh = batch_sharding(mesh)
    eval_fn = compile_eval_step(graphdef, objective, shardings, bsh)
    with jax.set_mesh(mesh):
        ctx = EvalContext(
            cfg=cfg, data=data, objective=objective, batches=objective.eval_batches(data),
            loss_sums=lambda b: eval_fn(state, jax.device_put(b, bsh)),
            model=lambda: nnx.merge(graphdef, state["params"], state["frozen"]),
        )
        results = run_evaluators(ctx)
    out = {"step": int(state["step"]), **results}
    (workdir / "eval").mkdir(exist_ok=True)
    (workdir / "eval" / f"step_{out['step']}.json").write_text(json.dumps(out, indent=1))
    return out
