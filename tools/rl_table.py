"""GRPO and PPO on the synthetic addition task, measured: experiments/sft_addition, then
experiments/grpo_addition from it (``--method grpo``), the same with
``objective.name=ppo`` (``--method ppo``: PPO's defaults, a value head, KL 0.05 to the SFT
model, with grpo_addition's prompts, 8 completions each, reward and lr), or both; for each,
markdown tables of the held-out accuracy before (the SFT model) and after, the train reward
per step, and where a step's time goes (the collect phase's rollouts ``train/rollout_s``, its
scoring ``train/reward_s`` and PPO's teacher-forced pass ``train/prepare_s``, against the
whole step); a reward-curve PNG beside them. Each run resumes from its workdir, so a
finished SFT run there is reused.

    python tools/rl_table.py [--workdir runs/rl_table] [--sft-steps 300] [--steps 100]
                             [--method grpo|ppo|both] [--tag NAME] [-- --config.optimizer.lr=1e-5 ...]

The RL runs' folders are ``METHOD`` (``METHOD_TAG`` with ``--tag``) under ``--workdir``.
Held-out accuracy is ``eval.rollout_reward``: greedy completions of the held-out problems
scored by ``reward.exact_match``. A step's time is read back from ``metrics.jsonl``
(logged every step, so each step's log waits for its update to finish and the next step's
rollouts start on finished weights); the update is the step less its collect phase.
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

from curves import plot_curves  # tools/curves.py, beside this script


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
    """Per logged step: ``reward``, ``rollout_s``, ``reward_s``, ``prepare_s`` (0 for GRPO) and
    ``step_s`` (the trainer logs tokens/s over batch_size x seq_len tokens, inverted here)."""
    out = []
    for r in read_metrics(workdir):
        if "train/reward" in r:
            step_s = cfg.train.batch_size * cfg.data.seq_len / r["train/tokens_per_sec"]
            out.append({"step": r["step"], "reward": r["train/reward"], "rollout_s": r["train/rollout_s"],
                        "reward_s": r["train/reward_s"], "prepare_s": r.get("train/prepare_s", 0.0),
                        "step_s": step_s, "completion_length": r["train/completion_length"]})
    return out


def plot(rows: list[dict], evals: dict[int, float], path: Path, method: str) -> None:
    curves = {"train reward": {r["step"]: r["reward"] for r in rows}, "held-out accuracy (greedy)": evals}
    plot_curves(curves, path, title=f"{method} on the addition task, from the SFT model", xlabel=f"{method} step",
                ylabel="exact match", smooth={"train reward": 10}, ylim=(0, 1), markers=("held-out accuracy (greedy)",))


def measure(method: str, args: argparse.Namespace, root: Path, common: list[str], sft_line: str) -> None:
    """Train ``method`` (grpo | ppo) from the SFT run, print its tables and write its PNG and JSON."""
    name = f"{method}_{args.tag}" if args.tag else method
    flags = common + [f"--config.init.from={root / 'sft'}", f"--config.train.steps={args.steps}",
                      f"--config.checkpoint.every={args.steps}", f"--config.eval.every={args.steps // 2}"]
    if method == "ppo":
        flags.append("--config.objective.name=ppo")
    cfg = load_config("grpo_addition", flags + args.overrides)
    label = method.upper()
    t = time.perf_counter()
    before = starting_accuracy(cfg, root / f"before_{name}")
    before_s = time.perf_counter() - t
    t = time.perf_counter()
    summary = train(cfg, root / name)
    run_s = time.perf_counter() - t

    rows = step_times(cfg, root / name)
    evals = {0: before["rollout_reward/reward"]}
    for r in read_metrics(root / name):
        if "eval/rollout_reward/reward" in r:
            evals[r["step"]] = r["eval/rollout_reward/reward"]
    steady = rows[1:]  # step 1 includes compiling the rollout and the update

    def median(key: str) -> float:
        return statistics.median(r[key] for r in steady)

    step_s, rollout_s, reward_s, prepare_s = (median(k) for k in ("step_s", "rollout_s", "reward_s", "prepare_s"))
    o = cfg.objective
    n_val = sum(1 for _ in open(cfg.data.val_path))
    print(f"\n{sft_line}; {label}: {args.steps} steps of {cfg.train.batch_size} prompts x {o.num_generations} "
          f"completions in {run_s:.0f} s (before-evaluation {before_s:.0f} s)\n")
    print(f"| held-out accuracy ({n_val} problems, greedy) | value |\n|---|---|")
    for step, acc in evals.items():
        print(f"| {f'SFT model (before {label})' if step == 0 else f'after {step} {label} steps'} | {acc:.3f} |")
    first, last = rows[:10], rows[-10:]
    print(f"\nmean train reward, steps {first[0]['step']}-{first[-1]['step']}: "
          f"{statistics.mean(r['reward'] for r in first):.3f}; steps {last[0]['step']}-{last[-1]['step']}: "
          f"{statistics.mean(r['reward'] for r in last):.3f}")
    print(f"\n| {label} steps | mean train reward | mean completion length |\n|---|---|---|")
    width = max(1, len(rows) // 10)
    for i in range(0, len(rows), width):
        chunk = rows[i:i + width]
        print(f"| {chunk[0]['step']}-{chunk[-1]['step']} | {statistics.mean(r['reward'] for r in chunk):.3f} | "
              f"{statistics.mean(r['completion_length'] for r in chunk):.2f} |")
    update_s = step_s - rollout_s - reward_s - prepare_s
    print(f"\n| time per {label} step (median of steps 2-{rows[-1]['step']}) | s | share |\n|---|---|---|")
    print(f"| rollouts ({cfg.train.batch_size * o.num_generations} completions of <= {o.max_new_tokens} tokens) "
          f"| {rollout_s:.3f} | {rollout_s / step_s:.0%} |")
    print(f"| rewards (decoding, {o.reward or 'the reward model'}) | {reward_s:.3f} | {reward_s / step_s:.0%} |")
    if method == "ppo":
        print(f"| old log-probs, values and reference log-probs (one teacher-forced pass each) | {prepare_s:.3f} | "
              f"{prepare_s / step_s:.0%} |")
    print(f"| update (teacher-forced forward + backward + AdamW) and the rest | {update_s:.3f} | "
          f"{update_s / step_s:.0%} |")
    print(f"| whole step | {step_s:.3f} | 100% |")
    print(f"| first step (compiles) | {rows[0]['step_s']:.1f} | |")
    png = root / f"{name}_reward.png"
    plot(rows, evals, png, label)
    (root / f"{name}_table.json").write_text(json.dumps({"before": before, "evals": evals, "rows": rows,
                                                         "run_s": run_s, "summary_eval": summary["eval"]}))
    print(f"\nwrote {png}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/rl_table")
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=100, help="GRPO / PPO steps")
    ap.add_argument("--method", choices=("grpo", "ppo", "both"), default="grpo")
    ap.add_argument("--tag", default="", help="the RL runs' folders are METHOD_TAG under --workdir")
    ap.add_argument("overrides", nargs="*", help="--config.a.b=v overrides of grpo_addition (after --)")
    args = ap.parse_args()
    root = Path(args.workdir)
    common = ["--config.train.progress=false", "--config.checkpoint.async_save=false"]
    sft = load_config("sft_addition", common + [f"--config.train.steps={args.sft_steps}",
                                                f"--config.checkpoint.every={args.sft_steps}"])
    t = time.perf_counter()
    sft_summary = train(sft, root / "sft")
    sft_s = time.perf_counter() - t
    sft_log = [r for r in read_metrics(root / "sft") if "train/loss" in r]
    sft_span = sft_log[-1]["time"] - sft_log[0]["time"]  # from its own log: a reused run too
    sft_line = (f"SFT: {args.sft_steps} steps, {sft_span:.0f} s from step 1 to {sft_log[-1]['step']} "
                f"({sft_s:.0f} s in this call), held-out loss on the answer bytes {sft_summary['eval']['loss']:.4f}")
    for method in ("grpo", "ppo") if args.method == "both" else (args.method,):
        measure(method, args, root, common, sft_line)


if __name__ == "__main__":
    main()
