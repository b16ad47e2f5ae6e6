"""Where a GRPO update's memory goes on SmolLM2-135M-Instruct: the compiled update step's XLA
buffers (arguments: parameters, optimizer state, the batch; temporaries: activations kept for
the backward pass, logits, gradients) for a few settings of tools/gsm8k_grpo.py, compiled only,
never run.

    python tools/grpo_memory.py [--data ../shared/data/gsm8k] [--settings "full:384:256:0:none,lora:256:160:32:full"]

Each setting is ``TRAINED:PROMPT_BUDGET:NEW_TOKENS:LOSS_CHUNK:REMAT`` (``TRAINED`` ``full`` or
``lora``, r=8 on q, k, v, o), at 2 prompts x 4 generations; the rows are as a rollout leaves
them (``prompt budget + new tokens`` positions each). The process's peak RSS is printed last
(it includes every compile).
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import jax
import numpy as np

from gsm8k_grpo import grpo_config, parser, peak_rss_gib
from bench_grpo import machine
from lmstack.distributed import global_batch
from lmstack.run import Run

SETTINGS = "full:384:256:0:none,lora:384:256:0:none,lora:256:160:0:none,lora:256:160:32:none,lora:256:160:32:full"


def update_memory(args) -> dict[str, float]:
    """GiB of the compiled update's arguments, outputs and temporaries, and its trained parameters."""
    cfg = grpo_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        run, _ = Run.for_training(cfg, Path(tmp) / "run")
        state = run.starting_state()
        o = cfg.objective
        rows, p, n = cfg.train.batch_size * o.num_generations, o.max_prompt_len, o.max_new_tokens
        batch = {"tokens": np.ones((rows, p + n), np.int32), "segment_ids": np.ones((rows, p + n), np.int32),
                 "positions": np.tile(np.arange(p + n, dtype=np.int32), (rows, 1)),
                 "completion_mask": np.ones((rows, n), np.int32), "advantages": np.ones((rows,), np.float32)}
        with jax.set_mesh(run.mesh):
            batch = global_batch(batch, run.batch_sharding)
            mem = run.train_step().lower(state, batch, jax.random.key(0)).compile().memory_analysis()
        trained = sum(x.size for x in jax.tree.leaves(state["params"]))
        del run, state
        gc.collect()
    gib = 1 / 2 ** 30
    return {"arguments": mem.argument_size_in_bytes * gib, "outputs": mem.output_size_in_bytes * gib,
            "temporaries": mem.temp_size_in_bytes * gib, "trained": trained}


def main() -> None:
    ap = parser()
    ap.add_argument("--settings", default=SETTINGS)
    args = ap.parse_args()
    print(f"{machine()}\n\n| trained | rows x positions (prompt + new) | loss_chunk | remat | trained parameters | "
          f"arguments GiB | temporaries GiB |\n|---|---|---|---|---|---|---|", flush=True)
    for setting in args.settings.split(","):
        trained, prompt, new, chunk, remat = setting.split(":")
        args.lora = 8 if trained == "lora" else 0
        args.max_prompt_len, args.new_tokens, args.loss_chunk, args.remat = int(prompt), int(new), int(chunk), remat
        m = update_memory(args)
        print(f"| {trained} | {args.prompts * args.generations} x {int(prompt) + int(new)} ({prompt} + {new}) | {chunk} | "
              f"{remat} | {m['trained'] / 1e6:.2f} M | {m['arguments']:.2f} | {m['temporaries']:.2f} |", flush=True)
    print(f"\nprocess peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
