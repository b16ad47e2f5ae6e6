"""Benchmark: train-step memory with and without the chunked cross-entropy (``objective.loss_chunk``).

    python tools/bench_ce_memory.py [--batch 4] [--seq-len 1024] [--chunks 0,512,128] [--rss]

A small trunk (SmolLM2-135M's widths: d_model 576, 9 query and 3 KV heads of 64, MLP 1536;
2 layers, float32) under two vocabularies: 49,152 with tied embeddings (SmolLM2) and 128,256
untied (Llama 3), after a row with a 256-token vocabulary that shows the trunk's own share
(its activations, attention probabilities included), which chunking does not touch. For each
vocabulary and each ``loss_chunk`` (0: the whole sequence, the full ``(batch, seq, vocab)``
float32 logits) the real compiled train step (causal LM, AdamW, clipping, one CPU device) is
lowered against the abstract train state and compiled, and its ``memory_analysis()`` printed:
the arguments (parameters, AdamW moments, batch), the temporaries XLA allocates (activations,
logits and their gradients, the parameters' gradients) and their sum with the outputs that do
not reuse a donated buffer. ``--rss`` also runs two steps per setting in a fresh process and
reports the process's peak resident memory (``ru_maxrss``: weights, optimizer state and the
Python runtime included) and the first loss.

Measured on the 2-core CPU machine (jax 0.10.2, batch 4 x 1024): step temporaries 2.81 ->
1.92 GiB at 49,152 (loss_chunk 128) and 6.42 -> 2.70 GiB at 128,256, over a trunk floor of
1.60 GiB; see the README's "Memory of the output head" for the table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VOCABS = ((256, True, "trunk alone"), (49152, True, "SmolLM2"), (128256, False, "Llama 3"))
GiB = 2**30


def config(vocab: int, tie: bool, chunk: int, batch: int, seq_len: int):
    from lmstack.config import compose
    from lmstack.configs.base import base_config

    c = base_config()
    c.model.update(vocab_size=vocab, tie_embeddings=tie, d_model=576, n_layers=2, n_heads=9, n_kv_heads=3,
                   head_dim=64, d_ff=1536)
    c.data.seq_len = seq_len
    c.train.batch_size = batch
    c.objective.loss_chunk = chunk
    return compose(c)


def build(cfg):
    """(compiled-to-be train step, abstract state, shardings, mesh) on one device."""
    import jax

    from lmstack import registry
    from lmstack.optim import make_optimizer
    from lmstack.sharding import batch_sharding, make_mesh
    from lmstack.step import compile_train_step
    from lmstack.trainstate import abstract_state, model_factory

    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    make_model, _ = model_factory(cfg, vocab_size=cfg.model.vocab_size)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    graphdef, abstract, shardings = abstract_state(make_model, tx, mesh)
    objective = registry.lookup("objective", cfg.objective.name)(cfg)
    step = compile_train_step(graphdef, tx, schedule, objective, 1, shardings, batch_sharding(mesh))
    return step, abstract, make_model, tx, mesh


def batch_of(cfg):
    import numpy as np

    b, n = cfg.train.batch_size, cfg.data.seq_len + 1
    rng = np.random.default_rng(0)
    return {"tokens": rng.integers(0, cfg.model.vocab_size, (b, n)).astype(np.int32),
            "segment_ids": np.ones((b, n), np.int32),
            "positions": np.broadcast_to(np.arange(n, dtype=np.int32), (b, n)).copy()}


def compiled_memory(cfg) -> dict[str, float]:
    """Bytes of the compiled step's arguments (state and batch), temporaries and their sum
    with the outputs that do not reuse a donated argument; and its compile seconds."""
    import jax

    step, abstract, *_ = build(cfg)
    start = time.perf_counter()
    compiled = step.lower(abstract, batch_of(cfg), jax.random.key(0)).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    live = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    return {"state": mem.argument_size_in_bytes, "temp": mem.temp_size_in_bytes, "total": live + mem.temp_size_in_bytes,
            "compile_s": seconds}


def run_one_step(cfg) -> dict[str, float]:
    """One real step in this process: its loss, wall seconds, and the process's peak RSS."""
    import jax

    from lmstack.trainstate import init_state

    step, _, make_model, tx, mesh = build(cfg)
    _, state, _ = init_state(make_model, tx, mesh)
    with jax.set_mesh(mesh):
        state, metrics = step(state, batch_of(cfg), jax.random.key(0))
        loss = float(metrics["loss"])
        start = time.perf_counter()
        state, metrics = step(state, batch_of(cfg), jax.random.key(1))
        float(metrics["loss"])
    return {"loss": loss, "step_s": time.perf_counter() - start,
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--chunks", default="0,512,128", help="objective.loss_chunk values (0: unchunked)")
    p.add_argument("--rss", action="store_true", help="also run one step per setting in a fresh process")
    p.add_argument("--one", help=argparse.SUPPRESS)  # "VOCAB,TIE,CHUNK": the --rss child
    args = p.parse_args()

    if args.one:
        import lmstack  # noqa: F401  (its XLA:CPU defaults, before jax creates its backend)

        vocab, tie, chunk = (int(x) for x in args.one.split(","))
        print(json.dumps(run_one_step(config(vocab, bool(tie), chunk, args.batch, args.seq_len))))
        return

    import lmstack  # noqa: F401  (its XLA:CPU defaults, before jax creates its backend)
    import jax

    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; trunk d=576, 2 layers, float32; "
          f"batch {args.batch} x {args.seq_len}")
    head = "| vocab | tied | loss_chunk | full logits | state + batch | step temporaries | total |"
    head += " peak RSS (1 step) | loss |" if args.rss else ""
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for vocab, tie, name in VOCABS:
        logits = args.batch * args.seq_len * vocab * 4
        for chunk in (int(x) for x in args.chunks.split(",")) if vocab > 256 else (0,):
            m = compiled_memory(config(vocab, tie, chunk, args.batch, args.seq_len))
            row = (f"| {vocab:,} ({name}) | {'yes' if tie else 'no'} | {chunk or 'off'} | {logits / GiB:.2f} GiB | "
                   f"{m['state'] / GiB:.2f} GiB | {m['temp'] / GiB:.2f} GiB | {m['total'] / GiB:.2f} GiB |")
            if args.rss:
                out = subprocess.run([sys.executable, __file__, "--one", f"{vocab},{int(tie)},{chunk}", "--batch",
                                      str(args.batch), "--seq-len", str(args.seq_len)],
                                     capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                row += f" {r['rss'] / GiB:.2f} GiB | {r['loss']:.4f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
