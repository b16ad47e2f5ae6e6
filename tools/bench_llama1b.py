"""Benchmark: the train step of a ~1B Llama-style model (Llama 3.2 1B by default), tokens/s per
device and MFU against the device's datasheet peak.

    python tools/bench_llama1b.py                                   # GPU/TPU: Llama 3.2 1B, bf16
    python tools/bench_llama1b.py --batch 16 --remat dots --attention-impl cudnn
    python tools/bench_llama1b.py --size smollm2-135m --layers 2 --batch 4 --seq-len 128   # CPU: a shrunk model

The step is the one ``lmstack train`` compiles (``experiments/pretrain_size.py`` for the size,
assembled by :class:`lmstack.run.Run` with a stand-in tokenizer, the causal LM objective,
AdamW, the mesh sharding), run on random tokens: ``--docs`` documents per row (packed rows
with segment ids; 1: one document per row). It prints one table: the machine, the model and
its FLOPs per token (:meth:`DecoderConfig.flops_per_token`: 6 x matmul parameters + 12 x
layers x heads x head_dim x sequence length, PaLM appendix B, no causal halving, no
rematerialisation counted), the compile time, the median step time over ``--steps`` steps
after ``--warmup``, tokens/s in all and per device, and MFU = model FLOP/s per device / the
device's peak. Peaks (dense, bf16): the datasheet table in :mod:`lmstack.perf` (H100 SXM and
H200 989 TFLOP/s, A100 312, TPU v5e 197, v5p 459); a CPU has no meaningful datasheet figure,
so its dense matmul rate is measured here, before and after the steps, and the better
reading is used. ``--attention-impl auto`` takes cuDNN flash attention on a GPU and
lmstack's einsums elsewhere. Extra ``--config.a.b=v`` arguments go to the experiment (e.g. a
mesh: ``--config.mesh.fsdp=-1 --config.mesh.data=1``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# the checkout's lmstack and the experiments' shared configs/ package, from any directory
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_batch(rng, batch: int, seq_len: int, vocab: int, docs: int) -> dict:
    """The causal LM objective's batch: ``tokens``, ``segment_ids`` and ``positions`` (int32,
    (batch, seq_len + 1)), random tokens in ``docs`` equal documents per row."""
    import numpy as np

    n = seq_len + 1
    cuts = np.linspace(0, n, docs + 1).astype(int)
    seg = np.zeros(n, np.int32)
    pos = np.zeros(n, np.int32)
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        seg[a:b] = i + 1
        pos[a:b] = np.arange(b - a)
    return {"tokens": rng.integers(0, vocab, (batch, n), dtype=np.int32),
            "segment_ids": np.broadcast_to(seg, (batch, n)).copy(),
            "positions": np.broadcast_to(pos, (batch, n)).copy()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="llama3.2-1b", help="a name of configs.models.SIZES (a decoder)")
    p.add_argument("--layers", type=int, default=0, help="n_layers (0: the size's); shrinks the model for a CPU")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute dtype")
    p.add_argument("--remat", default="projections", help="model.remat: none | full | dots | projections")
    p.add_argument("--attention-impl", default="auto", help="auto | xla_einsum | dot_product | cudnn")
    p.add_argument("--docs", type=int, default=1, help="documents packed per row")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps, the first compiles")
    args, overrides = p.parse_known_args()

    import lmstack  # noqa: F401  (lmstack's XLA:CPU defaults, set before jax starts)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    import jax
    import numpy as np

    from lmstack.aot import build_run
    from lmstack.config import load_config
    from lmstack.perf import DATASHEET, measure_matmul_flops, peak_flops

    platform = jax.default_backend()
    impl = args.attention_impl
    if impl == "auto":
        impl = "cudnn" if platform == "gpu" else "xla_einsum"
    sets = [f"--config.model.dtype={args.dtype}", f"--config.model.remat={args.remat}",
            f"--config.model.attention_impl={impl}"]
    if args.layers:
        sets.append(f"--config.model.n_layers={args.layers}")
    cfg = load_config(f"pretrain_size:size={args.size},batch={args.batch},seq_len={args.seq_len}",
                      [*sets, *overrides])
    if cfg.model.name != "decoder":
        sys.exit(f"--size {args.size} is a {cfg.model.name}: this benchmark trains decoders (causal LM)")

    peak_before = measure_matmul_flops(args.dtype, n=1024) if platform == "cpu" else 0.0
    run = build_run(cfg, jax.devices())
    mcfg = run.model_cfg
    state = run.init_state()
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    step = run.train_step()
    host = synthetic_batch(np.random.default_rng(0), args.batch, args.seq_len, mcfg.vocab_size, args.docs)
    batch = jax.device_put(host, run.batch_sharding)
    rng = jax.random.key(0)

    times = []
    with jax.set_mesh(run.mesh):
        t = time.perf_counter()
        state, metrics = step(state, batch, rng)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t
        for i in range(args.warmup - 1 + args.steps):
            t = time.perf_counter()
            state, metrics = step(state, batch, rng)
            jax.block_until_ready(metrics)
            if i >= args.warmup - 1:
                times.append(time.perf_counter() - t)
    loss = float(metrics["loss"])
    peak_after = measure_matmul_flops(args.dtype, n=1024) if platform == "cpu" else 0.0

    n_dev = jax.device_count()
    step_s = statistics.median(times)
    tokens = args.batch * args.seq_len
    tps = tokens / step_s
    fpt = mcfg.flops_per_token(args.seq_len)
    device = jax.devices()[0]
    if platform == "cpu":
        # the fake CPU devices share the host's cores: the host is the unit, its peak measured
        peak, per = max(peak_before, peak_after), 1
        peak_src = f"measured matmul, {peak_before / 1e9:.0f} before / {peak_after / 1e9:.0f} after (GFLOP/s)"
    else:
        peak, per = peak_flops(args.dtype), n_dev
        known = [name for name in DATASHEET if name.lower() in device.device_kind.lower()]
        peak_src = f"datasheet {known[0]} {args.dtype}" if known else "measured matmul (no datasheet entry)"
    model_flops = fpt * tps / per
    mem = (device.memory_stats() or {}) if hasattr(device, "memory_stats") else {}
    rows = [
        ("machine", f"{n_dev} x {device.device_kind} ({platform}), {os.cpu_count()} host cores, jax {jax.__version__}"),
        ("model", f"{args.size}, {mcfg.n_layers} layers, d={mcfg.d_model}, {mcfg.n_heads}/{mcfg.n_kv_heads} heads "
                  f"of {mcfg.head_dim}, d_ff={mcfg.d_ff}, vocab {mcfg.vocab_size}: {n_params / 1e6:,.1f}M parameters"),
        ("step", f"batch {args.batch} x {args.seq_len} tokens ({args.docs} document(s)/row), {args.dtype}, "
                 f"remat={args.remat}, attention_impl={impl}, mesh "
                 + " ".join(f"{k}={v}" for k, v in run.mesh.shape.items())),
        ("compile + first step s", f"{compile_s:.1f}"),
        ("step time ms (median)", f"{1e3 * step_s:.1f} over {len(times)} steps "
                                  f"(min {1e3 * min(times):.1f}, max {1e3 * max(times):.1f})"),
        ("tokens/s", f"{tps:,.0f}"),
        ("tokens/s/device", f"{tps / n_dev:,.0f}"),
        ("FLOPs/token", f"{fpt / 1e9:.3f} G (6N + attention)"),
        ("model TFLOP/s/" + ("host" if platform == "cpu" else "device"), f"{model_flops / 1e12:.3f}"),
        ("peak TFLOP/s", f"{peak / 1e12:.3f} ({peak_src})"),
        ("MFU", f"{100 * model_flops / peak:.1f}%"),
        ("loss after the steps", f"{loss:.4f}"),
    ]
    if "peak_bytes_in_use" in mem:
        rows.append(("peak memory GiB/device", f"{mem['peak_bytes_in_use'] / 2**30:.1f}"))
    w = max(len(r[0]) for r in rows)
    print()
    for name, value in rows:
        print(f"{name:<{w}}  {value}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
