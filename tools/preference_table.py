"""Preference optimisation measured at a small scale on CPU: one short LoRA run of
experiments/dpo_smollm2.py per loss (sigmoid DPO, IPO, SimPO, KTO) from SmolLM2-135M-Instruct,
a short reward model run of experiments/reward_model.py, and markdown tables of the held-out
pair accuracy and mean margin of each implicit reward before and after, with greedy answers to
two held-out prompts before and after.

    python tools/preference_table.py [--workdir runs/preference_table] [--steps 10] [--seq-len 256] [--losses sigmoid,ipo,simpo,kto]

Every run reads the same records (the first ``--records`` of dpo_en_demo.json, ``--val-fraction``
held out with the same seed), so all are scored on the same held-out pairs; the KTO run trains
on kto_en_demo.json and is scored on those pairs too (its implicit reward, beta 0.1, as DPO's).
Before training, the reference-based losses' implicit reward ``beta * (log pi - log pi_ref)`` is
0 on every reply (the policy is its reference): margin 0 and every pair a tie, which
eval.pair_accuracy counts as wrong (TRL's convention), so it is not measured. SimPO's is the base
model's own ranking (beta times the length-averaged log-probability), measured.

Cost on 2 shared CPU cores (load 4-16): 20-75 s a step, 4-21 minutes a run, ~7 GB of memory
(two at once were OOM-killed on a 23 GB machine beside other jobs). Measured: README's
"Preference optimisation".
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from lmstack.chat import reply
from lmstack.config import load_config
from lmstack.data.formats import load_records, split_records
from lmstack.evals.base import EvalContext
from lmstack.evals.pair_accuracy import pair_accuracy
from lmstack.evaluate import evaluate
from lmstack.run import Run
from lmstack.sample import open_for_generation
from lmstack.train import train

from curves import plot_curves, series  # tools/curves.py, beside this script

LOSSES = ("sigmoid", "ipo", "simpo", "kto")


def overrides(args: argparse.Namespace, steps: int, lr: float | None = None, evals: str = "'pair_accuracy',"
              ) -> list[str]:
    """The short-run settings every run shares; held-out evaluation by ``evals`` only (one
    pass over the held-out pairs: eval.perplexity would make a second); every step logged, for
    the reward curves."""
    out = [f"--config.eval.names=({evals})", "--config.train.progress=false", "--config.checkpoint.async_save=false", "--config.log.tensorboard=false",
           f"--config.train.steps={steps}", f"--config.train.batch_size={args.batch_size}",
           "--config.train.log_every=1", f"--config.data.seq_len={args.seq_len}",
           f"--config.data.max_records={args.records}", f"--config.data.val_fraction={args.val_fraction}",
           f"--config.optimizer.warmup_steps={max(steps // 10, 1)}", "--config.eval.every=0",
           "--config.eval.batches=0", f"--config.checkpoint.every={steps}", "--config.sample.max_new_tokens=1"]
    return out + ([f"--config.optimizer.lr={lr}"] if lr else [])


def held_out_prompts(cfg: Any, n: int) -> list[list[dict]]:
    """The ``n`` shortest prompts (messages) among the run's held-out pairs."""
    records = load_records(cfg.data)[:cfg.data.max_records or None]
    val = split_records(records, cfg.data.val_fraction, cfg.data.seed)[1]
    return sorted((r.prompt for r in val), key=lambda p: sum(len(m["content"]) for m in p))[:n]


def answers(model: Any, run: Run, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy replies through the run's chat template."""
    return [reply(model, run.spec.tokenizer, p, template=run.cfg.objective.chat_template,
                  max_new_tokens=max_new_tokens, temperature=0.0) for p in prompts]


def pair_scores(run: Run, data: Any, state: dict) -> dict[str, float]:
    """eval.pair_accuracy of ``state`` on the run's held-out pairs."""
    ctx = EvalContext(cfg=run.cfg, data=data, objective=run.objective, batches=run.objective.eval_batches(data),
                      loss_sums=None, model=lambda: run.model(state), run=run)
    return dict(pair_accuracy(ctx))


def reward_curves(workdir: Path, loss: str) -> Path:
    """``workdir/../LOSS_rewards.png``: the implicit rewards the run logged at every step, the
    batch means of ``rewards/chosen``, ``rewards/rejected`` and ``rewards/margins`` (KTO: the
    desirable and undesirable completions' mean reward, ``rewards/chosen_sum / count/chosen``
    as TRL's KTOTrainer reports it, and the reference point ``kl``)."""
    if loss == "kto":
        chosen, n_chosen = series(workdir, "train/rewards/chosen_sum"), series(workdir, "train/count/chosen")
        rejected, n_rejected = series(workdir, "train/rewards/rejected_sum"), series(workdir, "train/count/rejected")
        curves = {"rewards/chosen (desirable)": {s: v / n_chosen[s] for s, v in chosen.items() if n_chosen[s]},
                  "rewards/rejected (undesirable)": {s: v / n_rejected[s] for s, v in rejected.items() if n_rejected[s]},
                  "kl (reference point z)": series(workdir, "train/kl")}
    else:
        curves = {k: series(workdir, f"train/{k}") for k in ("rewards/chosen", "rewards/rejected", "rewards/margins")}
    return plot_curves(curves, workdir.parent / f"{loss}_rewards.png", xlabel=f"{loss} step",
                       ylabel="implicit reward (batch mean)",
                       title=f"{loss}, SmolLM2-135M-Instruct + LoRA: implicit rewards of each training batch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/preference_table")
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--records", type=int, default=300, help="the first N records of each data file")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=0.0, help="0: the experiment's")
    ap.add_argument("--rm-steps", type=int, default=10, help="reward model steps (0: skip it)")
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()
    root = Path(args.workdir)
    pair_cfg = load_config("dpo_smollm2", overrides(args, args.steps, args.lr))
    prompts = held_out_prompts(pair_cfg, 2)
    rows, samples = [], {}
    for loss in args.losses.split(","):
        cfg = load_config(f"dpo_smollm2:loss={loss}", overrides(args, args.steps, args.lr,
                                                                evals="" if loss == "kto" else "'pair_accuracy',"))
        workdir = root / loss
        before = {}
        if loss == "simpo" or not samples:
            run, data = Run.for_training(cfg, workdir)
            state = run.starting_state()
            if loss == "simpo":
                t = time.perf_counter()
                before = pair_scores(run, data, state)
                print(f"simpo before: {before} ({time.perf_counter() - t:.0f} s)", flush=True)
            if not samples:
                samples["before"] = answers(run.model(state), run, prompts, args.new_tokens)
            del run, data, state
        t = time.perf_counter()
        summary = train(cfg, workdir)
        wall = time.perf_counter() - t
        ev = summary["eval"] if loss != "kto" else evaluate(pair_cfg, workdir)  # KTO: scored on the held-out pairs
        run, model = open_for_generation(workdir)
        samples[loss] = answers(model, run, prompts, args.new_tokens)
        rows.append(dict(loss=loss, before=before, acc=ev["pair_accuracy/accuracy"], margin=ev["pair_accuracy/margin"],
                         pairs=int(ev["pair_accuracy/pairs"]), compile_s=summary["compile_s"],
                         ms=summary["ms_per_step"], wall=wall))
        print(f"{loss}: {rows[-1]}; wrote {reward_curves(workdir, loss)}", flush=True)
    rm = None
    if args.rm_steps:
        cfg = load_config("reward_model", overrides(args, args.rm_steps))
        t = time.perf_counter()
        summary = train(cfg, root / "reward_model")
        rm = dict(summary["eval"], compile_s=summary["compile_s"], ms=summary["ms_per_step"],
                  wall=time.perf_counter() - t)
        print(f"reward model: {rm}", flush=True)

    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {args.steps} steps of "
          f"{args.batch_size} pairs, {args.seq_len} tokens, LoRA r=8 q,k,v,o\n")
    print("| loss | held-out pairs | accuracy before | margin before | accuracy after | margin after | "
          "step 1 s (compile) | s/step | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["before"]
        acc_b, mar_b = (f"{b['accuracy']:.3f}", f"{b['margin']:.4f}") if b else ("0 (ties)", "0")
        print(f"| {r['loss']} | {r['pairs']} | {acc_b} | {mar_b} | {r['acc']:.3f} | {r['margin']:.4f} | "
              f"{r['compile_s']:.0f} | {r['ms'] / 1e3:.1f} | {r['wall']:.0f} |")
    if rm:
        print(f"\nreward model ({args.rm_steps} steps of {args.batch_size} pairs, every weight): held-out pair "
              f"accuracy {rm['pair_accuracy/accuracy']:.3f}, margin {rm['pair_accuracy/margin']:.3f} over "
              f"{int(rm['pair_accuracy/pairs'])} pairs; compile {rm['compile_s']:.0f} s, "
              f"{rm['ms'] / 1e3:.1f} s/step, wall {rm['wall']:.0f} s")
    for i, p in enumerate(prompts):
        print(f"\n**Prompt {i + 1}:** {p[-1]['content']!r}\n")
        for name, texts in samples.items():
            print(f"- {name}: {texts[i]!r}")


if __name__ == "__main__":
    main()
