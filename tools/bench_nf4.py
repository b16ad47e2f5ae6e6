"""Benchmark: NF4 storage of SmolLM2-135M's linear weights (QLoRA base weights).

    python tools/bench_nf4.py [--runs 20] [--block-size 64]

SmolLM2-135M: 30 layers, d_model 576, 9 query heads and 3 KV heads of 64, MLP width 1536,
vocabulary 49152 with tied embeddings (the embedding stays bfloat16, as QLoRA keeps it). Prints
one table: the bytes of every stacked linear weight (lmstack layout, layers first) in float32,
bfloat16, NF4 and NF4 with double quantisation (``lmstack.peft.nf4.nf4_bytes``, equal to the
stored arrays' ``nbytes``), their ratio to bfloat16, the whole model with the embedding in
bfloat16, then per layer on this machine's CPU: the median time to dequantise the seven weights
of one layer to bfloat16 under ``jax.jit`` (each timed after a compiling call), the one-off
quantisation time, and the relative Frobenius error of the dequantised weights (N(0, 0.02) draws).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

L, D, N_HEADS, N_KV, HEAD, F, VOCAB = 30, 576, 9, 3, 64, 1536, 49152
LINEAR = {  # lmstack parameter names and stacked shapes (see tests/peft/test_nf4.py)
    "blocks.attn.q": (L, D, N_HEADS, HEAD),
    "blocks.attn.k": (L, D, N_KV, HEAD),
    "blocks.attn.v": (L, D, N_KV, HEAD),
    "blocks.attn.o": (L, N_HEADS, HEAD, D),
    "blocks.mlp.gate": (L, D, F),
    "blocks.mlp.up": (L, D, F),
    "blocks.mlp.down": (L, F, D),
}


def median_seconds(fn, runs: int) -> float:
    fn()  # compile
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20, help="timed dequantisations per setting (median reported)")
    p.add_argument("--block-size", type=int, default=64)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from lmstack.peft.nf4 import dequantize_nf4, nf4_bytes, quantize_nf4

    bs = args.block_size
    rows = []
    for name, shape in LINEAR.items():
        n = math.prod(shape)
        rows.append((name, shape, 4 * n, 2 * n, nf4_bytes(shape, bs, False, 1), nf4_bytes(shape, bs, True, 1)))
    total = [sum(r[i] for r in rows) for i in range(2, 6)]
    embed = 2 * VOCAB * D

    mib = 2**20
    print(f"SmolLM2-135M linear weights, NF4 block size {bs} (bytes; MiB in the totals)")
    print(
        f"{'weight':<17} {'shape':<19} {'fp32':>10} {'bf16':>10} {'nf4':>10} {'nf4+dq':>10} {'nf4/bf16':>9} {'dq/bf16':>8}"
    )
    for name, shape, fp32, bf16, nf4, dq in rows:
        shape_s = "x".join(map(str, shape))
        print(f"{name:<17} {shape_s:<19} {fp32:>10} {bf16:>10} {nf4:>10} {dq:>10} {nf4 / bf16:>9.2%} {dq / bf16:>8.2%}")
    fp32, bf16, nf4, dq = total
    n_linear = bf16 // 2
    print(
        f"{'linear total':<37} {fp32 / mib:>9.1f}M {bf16 / mib:>9.1f}M {nf4 / mib:>9.1f}M {dq / mib:>9.1f}M"
        f" {nf4 / bf16:>9.2%} {dq / bf16:>8.2%}"
    )
    print(f"{'  bits per weight':<37} {32:>10} {16:>10} {8 * nf4 / n_linear:>10.3f} {8 * dq / n_linear:>10.3f}")
    print(
        f"{'+ embedding in bf16':<37} {(fp32 + 2 * embed) / mib:>9.1f}M {(bf16 + embed) / mib:>9.1f}M"
        f" {(nf4 + embed) / mib:>9.1f}M {(dq + embed) / mib:>9.1f}M"
        f" {(nf4 + embed) / (bf16 + embed):>9.2%} {(dq + embed) / (bf16 + embed):>8.2%}"
    )

    rng = np.random.default_rng(0)
    layer = {name: (0.02 * rng.standard_normal(shape[1:])).astype(np.float32) for name, shape in LINEAR.items()}
    print(f"\nOne layer's 7 weights on {jax.devices()[0].device_kind}, median of {args.runs} runs:")
    print(f"{'storage':<8} {'dequantise ms':>14} {'quantise ms':>12} {'rel. error':>11}")
    for double_quant in (False, True):
        quantize = jax.jit(lambda ws, dq=double_quant: {k: quantize_nf4(w, bs, dq) for k, w in ws.items()})
        stored = quantize(layer)
        dequantize = jax.jit(lambda qs: {k: dequantize_nf4(q, jnp.bfloat16) for k, q in qs.items()})
        t_deq = median_seconds(lambda: jax.block_until_ready(dequantize(stored)), args.runs)
        t_q = median_seconds(lambda: jax.block_until_ready(quantize(layer)), max(3, args.runs // 4))
        w_hat = {k: np.asarray(v, np.float32) for k, v in dequantize(stored).items()}
        err = math.sqrt(sum(np.sum((w_hat[k] - w) ** 2) for k, w in layer.items()))
        rel = err / math.sqrt(sum(np.sum(w**2) for w in layer.values()))
        print(f"{'nf4+dq' if double_quant else 'nf4':<8} {1e3 * t_deq:>14.2f} {1e3 * t_q:>12.2f} {rel:>11.4f}")
    bf16_copy = jax.jit(lambda ws: {k: (w + 0).astype(jnp.bfloat16) for k, w in ws.items()})
    layer_bf16 = {k: jnp.asarray(w, jnp.bfloat16) for k, w in layer.items()}
    t_copy = median_seconds(lambda: jax.block_until_ready(bf16_copy(layer_bf16)), args.runs)
    print(f"{'bf16':<8} {1e3 * t_copy:>14.2f} {'(a copy of the bf16 weights, for scale)':>40}")


if __name__ == "__main__":
    main()
