"""Identity before and after: the greedy replies of experiments/identity_lora.py's model to
"Who are you?" and two more questions, through its chat template, before training (the
starting weights, adapters at zero) and after.

    python tools/identity_answers.py --workdir runs/identity_lora [--experiment identity_lora]
        [--max-new-tokens 40] [--config.a.b=v ...]

Trains the experiment in ``--workdir`` (a fresh one, or it resumes), then prints the replies,
the reply the data teaches for "Who are you?", the training loss at the first and last logged
steps, the held-out loss, steps, median step time, wall time and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lmstack and configs/

QUESTIONS = ("Who are you?", "What is your name?", "Who created you?")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="identity_lora", help="NAME or NAME:arg (e.g. identity_lora:smoke=True)")
    p.add_argument("--workdir", default="runs/identity_lora")
    p.add_argument("--max-new-tokens", type=int, default=40)
    args, overrides = p.parse_known_args()

    import lmstack  # noqa: F401  (XLA:CPU defaults before jax starts)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    from lmstack.chat import reply
    from lmstack.config import load_config
    from lmstack.data.formats import load_records
    from lmstack.distributed import fetch
    from lmstack.metrics_log import read_metrics
    from lmstack.run import Run
    from lmstack.sample import open_for_generation
    from lmstack.train import train

    cfg = load_config(args.experiment, ["--config.train.progress=false", *overrides])
    template = cfg.objective.chat_template

    def answers(model, tokenizer) -> list[str]:
        return [reply(model, tokenizer, [{"role": "user", "content": q}], template=template,
                      max_new_tokens=args.max_new_tokens, temperature=0.0) for q in QUESTIONS]

    load = [os.getloadavg()[0]]
    run, data = Run.for_training(cfg, args.workdir)
    before = answers(run.model(fetch(run.starting_state())), data.tokenizer)
    taught = next((r.messages[-1]["content"] for r in load_records(cfg.data)
                   if r.messages[-2]["content"] == QUESTIONS[0]), "(not in the data)")
    del run, data
    t0 = time.perf_counter()
    summary = train(cfg, args.workdir)
    wall = time.perf_counter() - t0
    load.append(os.getloadavg()[0])
    run, model = open_for_generation(args.workdir)
    after = answers(model, run.spec.tokenizer)
    losses = [(r["step"], r["train/loss"]) for r in read_metrics(args.workdir) if "train/loss" in r]

    print(f"\n{cfg.name}: {cfg.peft.name} ({summary['trainable_params']:,} of {summary['params']:,} parameters "
          f"trainable), {summary['step']} steps of {cfg.train.batch_size} x {cfg.data.seq_len} tokens, from "
          f"{run.spec.lineage.get('from', 'scratch')}")
    print(f"training loss {losses[0][1]:.3f} at step {losses[0][0]} -> {losses[-1][1]:.3f} at step {losses[-1][0]}; "
          f"held-out loss {summary['eval']['loss']:.3f}")
    ms = summary["ms_per_step"]
    print(f"median step {ms / 1e3:.1f} s, compile {summary['compile_s']:.0f} s, training wall {wall:.0f} s; "
          f"load average {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} CPUs")
    print(f"the data's reply to {QUESTIONS[0]!r}: {taught}")
    for q, b, a in zip(QUESTIONS, before, after):
        print(f"\n> {q}\n  before: {json.dumps(b)}\n  after:  {json.dumps(a)}")


if __name__ == "__main__":
    main()
