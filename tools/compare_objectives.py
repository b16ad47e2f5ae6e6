"""Benchmark: pre-training objectives compared at the same compute budget (FLOPs).

    python tools/compare_objectives.py --budget-steps 400 --sst2 ../shared/data/sst2

Every experiment runs in the shared stdlib setting (configs/pretrain.py). The
budget is what the causal-LM experiment spends in ``--budget-steps`` steps, counted by
XLA's cost analysis of each compiled train step (so encoder-decoder, encoder and two-tower
steps are counted by what they really compute); each experiment gets as many steps as fit.
The table reports, as measured: held-out loss (each objective's own loss, so not
comparable across rows), the SST-2 dev accuracy of a linear probe on frozen pooled
features, and code-search recall@10 for the contrastive run.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

EXPERIMENTS = ["causal_lm", "prefix_lm", "t5_span_corruption", "ul2", "bart_denoising", "bert_mlm",
               "code_search_contrastive"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-steps", type=int, default=400, help="causal_lm steps that define the FLOPs budget")
    p.add_argument("--sst2", default="../shared/data/sst2")
    p.add_argument("--workdir", default="runs/compare")
    p.add_argument("--only", nargs="*", default=EXPERIMENTS)
    p.add_argument("--smoke", action="store_true", help="tiny versions of everything (seconds)")
    args = p.parse_args()

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    import jax

    from lmstack.config import apply_overrides, load_config
    from lmstack.evaluate import evaluate
    from lmstack.perf import train_step_flops
    from lmstack.train import train

    spec = lambda name: f"{name}:smoke=True" if args.smoke else name  # noqa: E731
    common = ["--config.train.progress=false"]
    one_device = [*common, "--config.mesh.data=1"]  # XLA's cost analysis then counts the whole step

    @functools.cache  # each experiment's step is compiled once, causal_lm's serving the budget too
    def step_flops(name: str) -> float:
        return train_step_flops(load_config(spec(name), one_device), Path(args.workdir) / "flops")

    budget = step_flops("causal_lm") * args.budget_steps
    rows = []
    for name in args.only:
        cfg = load_config(spec(name), common)
        per_step = step_flops(name)
        steps = max(1, int(budget // per_step))
        apply_overrides(cfg, [f"--config.train.steps={steps}", f"--config.checkpoint.every={steps}",
                              f"--config.eval.every={steps}", f"--config.optimizer.warmup_steps={max(1, steps // 10)}"])
        workdir = Path(args.workdir) / name
        t0 = time.perf_counter()
        summary = train(cfg, workdir)
        wall = time.perf_counter() - t0
        probe_cfg = load_config(spec(name), [*common, f"--config.train.steps={steps}",
                                             f"--config.optimizer.warmup_steps={max(1, steps // 10)}",
                                             "--config.eval.names=('linear_probe',)",
                                             f"--config.eval.linear_probe.path={args.sst2}"])
        probe = evaluate(probe_cfg, workdir)
        rows.append({
            "experiment": name, "params": summary.get("params"), "steps": steps,
            "flops": per_step * steps, "wall_s": wall, "heldout_loss": summary["eval"]["loss"],
            "sst2_probe_acc": probe["linear_probe/accuracy"],
            "recall@10": summary["eval"].get("retrieval/recall@10"),
        })
        (Path(args.workdir) / "table.json").write_text(json.dumps(rows, indent=1))
    print(f"\nmachine: {jax.devices()[0].device_kind} x{jax.device_count()}; budget {budget:.3g} FLOPs "
          f"(causal_lm x {args.budget_steps} steps)")
    print(f"{'experiment':<24} {'steps':>6} {'FLOPs':>9} {'wall s':>7} {'held-out loss':>14} "
          f"{'SST-2 probe':>12} {'recall@10':>10}")
    for r in rows:
        rec = f"{r['recall@10']:.3f}" if r["recall@10"] is not None else "-"
        print(f"{r['experiment']:<24} {r['steps']:>6} {r['flops']:>9.3g} {r['wall_s']:>7.0f} "
              f"{r['heldout_loss']:>14.4f} {r['sst2_probe_acc']:>12.3f} {rec:>10}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
