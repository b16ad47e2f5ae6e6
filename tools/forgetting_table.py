"""Forgetting in continued pre-training, measured at a tiny scale: a parent trained on the
standard library (quickstart:smoke=True's model, ``--parent-steps`` steps), then one child per
method of experiments/continued_pretraining.py trained on Tiny Shakespeare from it
(``--steps`` steps each), and a markdown table of the parent's held-out perplexity before and
after, their ratio, and the new corpus's perplexity.

    python tools/forgetting_table.py --data ../shared/data/tinyshakespeare/input.txt [--workdir runs/forgetting]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from lmstack.config import import_experiment, load_config
from lmstack.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the child's corpus (Tiny Shakespeare's input.txt)")
    ap.add_argument("--workdir", default="runs/forgetting_table")
    ap.add_argument("--parent-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--methods", default=",".join(import_experiment("continued_pretraining").METHODS),
                    help="comma-separated methods of experiments/continued_pretraining.py (default: all)")
    args = ap.parse_args()
    root = Path(args.workdir)
    common = ["--config.train.progress=false", "--config.checkpoint.async_save=false"]
    parent = load_config("quickstart:smoke=True", common + [f"--config.train.steps={args.parent_steps}",
                                                            "--config.eval.every=0", "--config.eval.batches=8",
                                                            f"--config.checkpoint.every={args.parent_steps}"])
    t = time.perf_counter()
    summary = train(parent, root / "parent")
    print(f"parent: {args.parent_steps} steps, held-out perplexity {summary['eval']['perplexity']:.2f} "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    rows = []
    for method in args.methods.split(","):
        cfg = load_config(f"continued_pretraining:smoke=True,method={method},parent={root / 'parent'}",
                          common + [f"--config.data.path={args.data}", f"--config.train.steps={args.steps}",
                                    "--config.optimizer.warmup_steps=10", "--config.eval.every=0",
                                    "--config.eval.batches=8", f"--config.checkpoint.every={args.steps}",
                                    "--config.train.log_every=10"]
                          + (["--config.regularization.fisher_batches=16"] if method == "ewc" else []))
        t = time.perf_counter()
        ev = train(cfg, root / method)["eval"]
        rows.append((method, ev["forgetting/parent_ppl_before"], ev["forgetting/parent_ppl_now"],
                     ev["forgetting/ratio"], ev["perplexity"], time.perf_counter() - t))
        print(f"{method}: done ({rows[-1][-1]:.0f} s)", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| method | parent ppl before | parent ppl after | ratio | Shakespeare ppl | wall s |")
    print("|---|---|---|---|---|---|")
    for method, before, now, ratio, ppl, secs in rows:
        print(f"| {method} | {before:.2f} | {now:.2f} | {ratio:.3f} | {ppl:.2f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
