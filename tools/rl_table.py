"""GRPO on the synthetic addition task, measured: experiments/sft_addition then
experiments/grpo_addition from it, and a markdown table of the held-out accuracy before
(the SFT model) and after GRPO, the reward per step, and where a step's time goes (the
rollouts of the collect phase, ``train/rollout_s``, against the whole step); a reward-curve
PNG beside it. Each run resumes from its workdir, so a finished SFT run there is reused.

    python tools/rl_table.py [--workdir runs/rl_table] [--sft-steps 300] [--grpo-steps 100]
                             [--grpo-workdir grpo] [-- --config.optimizer.lr=1e-5 ...]

Held-out accuracy is ``eval.rollout_reward``: greedy completions of the held-out problems
scored by ``reward.exact_match``. A step's time is read back from ``metrics.jsonl``
(logged every step, so each step's log waits for its update to finish and the next step's
rollouts start on finished weights); the update is the step less its rollouts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax

from lmstack.config import load_config
from lmstack.evals.base import EvalContext, run_evaluators
from lmstack.metrics_log import read_metrics
from lmstack.run import Run
from lmstack.train import train


def starting_accuracy(cfg, workdir: Path) -> dict[str, float]:
    """The evaluators of ``cfg`` (eval.rollout_reward) on the weights its run starts from
    (``init.from``), as the trainer evaluates them; no step is taken."""
    run, data = Run.for_training(cfg, workdir)
    state = run.starting_state()
    run.objective.eval_batches(data)  # keeps the held-out prompts and answers
    with jax.set_mesh(run.mesh):
        ctx = EvalContext(cfg=run.cfg, data=data, objective=run.objective, batches=[], loss_sums=None,
                          model=lambda: run.model(state), run=run)
        return run_evaluators(ctx)


def step_times(cfg, workdir: Path) -> list[dict[str, float]]:
    """Per logged step: ``reward``, ``rollout_s`` and ``step_s`` (the trainer logs tokens/s over
    batch_size x seq_len tokens, inverted here)."""
    out = []
    for r in read_metrics(workdir):
        if "train/reward" in r:
            step_s = cfg.train.batch_size * cfg.data.seq_len / r["train/tokens_per_sec"]
            out.append({"step": r["step"], "reward": r["train/reward"], "rollout_s": r["train/rollout_s"],
                        "step_s": step_s, "completion_length": r["train/completion_length"]})
    return out


def plot(rows: list[dict], evals: dict[int, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    rewards = [r["reward"] for r in rows]
    k = 10
    smooth = [statistics.mean(rewards[max(0, i - k + 1):i + 1]) for i in range(len(rewards))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, rewards, color="0.75", label="train reward (mean of the step's completions)")
    ax.plot(steps, smooth, color="C0", label=f"train reward, mean of {k} steps")
    ax.plot(list(evals), list(evals.values()), "o-", color="C3", label="held-out accuracy (greedy)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1)
    ax.set_title("GRPO on the addition task, from the SFT model")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/rl_table")
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--grpo-steps", type=int, default=100)
    ap.add_argument("--grpo-workdir", default="grpo", help="the GRPO run's folder under --workdir")
    ap.add_argument("overrides", nargs="*", help="--config.a.b=v overrides of grpo_addition (after --)")
    args = ap.parse_args()
    root = Path(args.workdir)
    common = ["--config.train.progress=false", "--config.checkpoint.async_save=false"]
    sft = load_config("sft_addition", common + [f"--config.train.steps={args.sft_steps}",
                                                f"--config.checkpoint.every={args.sft_steps}"])
    t = time.perf_counter()
    sft_summary = train(sft, root / "sft")
    sft_s = time.perf_counter() - t
    grpo_flags = common + [f"--config.init.from={root / 'sft'}", f"--config.train.steps={args.grpo_steps}",
                           f"--config.checkpoint.every={args.grpo_steps}", f"--config.eval.every={args.grpo_steps // 2}"]
    grpo = load_config("grpo_addition", grpo_flags + args.overrides)
    t = time.perf_counter()
    before = starting_accuracy(grpo, root / "before")
    before_s = time.perf_counter() - t
    t = time.perf_counter()
    summary = train(grpo, root / args.grpo_workdir)
    grpo_s = time.perf_counter() - t

    rows = step_times(grpo, root / args.grpo_workdir)
    evals = {0: before["rollout_reward/reward"]}
    for r in read_metrics(root / args.grpo_workdir):
        if "eval/rollout_reward/reward" in r:
            evals[r["step"]] = r["eval/rollout_reward/reward"]
    steady = rows[1:]  # step 1 includes compiling the rollout and the update
    step_s = statistics.median(r["step_s"] for r in steady)
    rollout_s = statistics.median(r["rollout_s"] for r in steady)
    o = grpo.objective
    n_val = sum(1 for _ in open(grpo.data.val_path))
    sft_log = [r for r in read_metrics(root / "sft") if "train/loss" in r]
    sft_span = sft_log[-1]["time"] - sft_log[0]["time"]  # from its own log: a reused run too
    print(f"\nSFT: {args.sft_steps} steps, {sft_span:.0f} s from step 1 to {sft_log[-1]['step']} "
          f"({sft_s:.0f} s in this call), held-out loss on the answer bytes "
          f"{sft_summary['eval']['loss']:.4f}; GRPO: {args.grpo_steps} steps of {grpo.train.batch_size} prompts x "
          f"{o.num_generations} completions in {grpo_s:.0f} s (before-evaluation {before_s:.0f} s)\n")
    print(f"| held-out accuracy ({n_val} problems, greedy) | value |\n|---|---|")
    for step, acc in evals.items():
        print(f"| {'SFT model (before GRPO)' if step == 0 else f'after {step} GRPO steps'} | {acc:.3f} |")
    print("\n| GRPO steps | mean train reward | mean completion length |\n|---|---|---|")
    width = max(1, len(rows) // 10)
    for i in range(0, len(rows), width):
        chunk = rows[i:i + width]
        print(f"| {chunk[0]['step']}-{chunk[-1]['step']} | {statistics.mean(r['reward'] for r in chunk):.3f} | "
              f"{statistics.mean(r['completion_length'] for r in chunk):.2f} |")
    print(f"\n| time per GRPO step (median of steps 2-{rows[-1]['step']}) | s | share |\n|---|---|---|")
    print(f"| rollouts ({grpo.train.batch_size * o.num_generations} completions of <= {o.max_new_tokens} tokens) "
          f"| {rollout_s:.3f} | {rollout_s / step_s:.0%} |")
    print(f"| update (teacher-forced forward + backward + AdamW) and the rest | {step_s - rollout_s:.3f} | "
          f"{1 - rollout_s / step_s:.0%} |")
    print(f"| whole step | {step_s:.3f} | 100% |")
    print(f"| first step (compiles) | {rows[0]['step_s']:.1f} | |")
    png = root / f"{args.grpo_workdir}_reward.png"
    plot(rows, evals, png)
    (root / f"{args.grpo_workdir}_table.json").write_text(json.dumps({"before": before, "evals": evals, "rows": rows,
                                                    "sft_s": sft_s, "grpo_s": grpo_s, "summary_eval": summary["eval"]}))
    print(f"\nwrote {png}")


if __name__ == "__main__":
    main()
