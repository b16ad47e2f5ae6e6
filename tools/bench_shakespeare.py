"""Benchmark: lmstack against PyTorch on nanoGPT's CPU baseline, side by side in one run.

    python tools/bench_shakespeare.py --data ../shared/data/tinyshakespeare/input.txt
    python tools/bench_shakespeare.py --reps 10 --iters 199   # nanoGPT's 2000 iterations (10 warmup + 10 x 199)

Both implementations train the config of ``experiments/shakespeare_char.py`` in one
invocation on this machine: lmstack's compiled step in this process, and the plain PyTorch
loop of ``tools/nanogpt_torch_reference.py`` in a process of its own (spawned, without JAX:
beside JAX's thread pools torch's OpenMP threads ran 2.5-4x slower on a loaded machine),
built from the same config values (width, depth, heads, block, batch, AdamW and its
schedule) and fed the same token ids. They never run at the same time. After ``--warmup``
untimed iterations each (lmstack's compile among them), they take turns, ``--reps`` times,
each turn ``--iters`` iterations (the order flips every repetition, so a drift of the
machine's speed falls on both). The XLA fp32 matmul peak
(``lmstack.perf.measure_matmul_flops``) is measured before the first and after every turn.

It prints, per side, the median over repetitions of the ms per iteration (a turn's wall
time over its iterations, the last update finished), tokens/s and MFU against the median
peak reading; the ratio of the speeds (lmstack / PyTorch, > 1: lmstack faster), the median
of the per-repetition ratios; and, at the same iteration count, the validation loss by two
estimators over the same windows for both: the whole validation split (lmstack's
``eval.batches=0``), and nanoGPT's ``estimate_loss`` (the mean over ``--eval-iters`` batches
of ``train.batch_size`` random windows; batch k's windows drawn by numpy from the seed
``(--eval-seed, k)``). Without torch it says so in one line and prints lmstack's figures alone.

Extra ``--config.a.b=v`` arguments go to the experiment and, where the PyTorch side has the
same knob, to it as well (e.g. ``--config.model.n_layers=6``); a setting it lacks (bf16,
dropout, biases, ...) is named and lmstack runs alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))


class LmstackSide:
    """lmstack's run of ``cfg``: its compiled train and eval steps on its mesh."""

    name = "lmstack"

    def __init__(self, cfg: Any, workdir: str):
        from lmstack.run import Run

        self.run, self.data = Run.for_training(cfg, workdir)
        self.cfg = self.run.cfg
        self.state = self.run.init_state()
        self.step_fn, self.eval_fn = self.run.train_step(), self.run.eval_step()
        self.batches = self.run.objective.train_batches(self.data)
        self.seed_key = self.run.seed_key()

    def train(self, n: int) -> float:
        """Seconds for ``n`` updates, up to the last one's result."""
        import jax

        from lmstack.distributed import global_batch

        t0 = time.perf_counter()
        with jax.set_mesh(self.run.mesh):
            for _ in range(n):
                batch = global_batch(next(self.batches), self.run.batch_sharding, self.cfg.train.batch_size)
                self.state, metrics = self.step_fn(self.state, batch, self.seed_key)
                jax.block_until_ready(metrics)  # one step in flight, as lmstack.train (see lmstack.cpu_defaults)
        return time.perf_counter() - t0

    def loss(self, batches: list[dict[str, np.ndarray]]) -> float:
        """Summed loss over the batches' targets / their count (the objective's mask)."""
        import jax

        from lmstack.distributed import global_batch

        total = weight = 0.0
        with jax.set_mesh(self.run.mesh):
            for b in batches:
                out = jax.device_get(self.eval_fn(self.state, global_batch(b, self.run.batch_sharding)))
                total, weight = total + float(out["loss"]), weight + float(out["weight"])
        return total / weight


class TorchSide:
    """The PyTorch reference (tools/nanogpt_torch_reference.py) on lmstack's token ids, in a
    process of its own (spawned: no JAX in it) that answers over a pipe."""

    name = "PyTorch"

    def __init__(self, hyper: Any, train_tokens: np.ndarray, vocab: int, seed: int, threads: int = 0):
        import multiprocessing

        import nanogpt_torch_reference as ref

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=ref.serve, args=(child, hyper, train_tokens, vocab, seed, threads),
                                   daemon=True)
        self.process.start()
        child.close()
        self.version, self.threads = self._answer()

    def _answer(self) -> Any:
        out = self.conn.recv()
        if isinstance(out, tuple) and out and out[0] == "error":
            raise RuntimeError(f"the PyTorch side failed:\n{out[1]}")
        return out

    def _call(self, command: str, arg: Any = None) -> Any:
        self.conn.send((command, arg))
        return self._answer()

    def train(self, n: int) -> float:
        """Seconds for ``n`` updates, timed in the child."""
        return self._call("train", n)

    def loss(self, batches: list[dict[str, np.ndarray]]) -> float:
        """The same windows and mask as lmstack's causal_lm objective (one document: plain
        causal attention over each window)."""
        windows = []
        for b in batches:
            tokens, seg = b["tokens"].astype(np.int64), b["segment_ids"]
            windows.append((tokens[:, :-1], tokens[:, 1:], (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)))
        total, weight = self._call("loss", windows)
        return total / weight

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Replace the model's weights (torch state_dict names, numpy arrays)."""
        self._call("load", state)

    def close(self) -> None:
        self.conn.send(("stop", None))
        self.process.join()


def torch_hyper(ref: Any, cfg: Any) -> tuple[Any, list[str]]:
    """The reference's ``Hyper`` from lmstack's config, and the settings it cannot follow."""
    m, o = cfg.model, cfg.optimizer
    wanted = {"model.style": (m.style, "gpt2"), "model.use_bias": (m.use_bias, False),
              "model.tie_embeddings": (m.tie_embeddings, True), "model.dropout": (m.dropout, 0.0),
              "model.dtype": (m.dtype, "float32"), "model.n_kv_heads": (m.n_kv_heads or m.n_heads, m.n_heads),
              "model.head_dim": (m.head_dim or m.d_model // m.n_heads, m.d_model // m.n_heads),
              "model.d_ff": (m.d_ff or 4 * m.d_model, 4 * m.d_model), "model.activation": (m.activation or "gelu", "gelu"),
              "model.norm_eps": (m.norm_eps, 1e-5), "model.init_std": (m.init_std, 0.02),
              "optimizer.schedule": (o.schedule, "cosine"), "optimizer.decay_embeddings": (o.decay_embeddings, True),
              "train.microbatches": (cfg.train.microbatches, 1)}
    lacks = [f"{k}={v!r}" for k, (v, want) in wanted.items() if v != want]
    hyper = ref.Hyper(d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, block=cfg.data.seq_len,
                      batch=cfg.train.batch_size, lr=o.lr, min_lr=o.lr * o.min_lr_ratio, warmup=o.warmup_steps,
                      iters=o.decay_steps or cfg.train.steps, weight_decay=o.weight_decay, betas=(o.b1, o.b2),
                      eps=o.eps, clip=o.clip_norm)
    return hyper, lacks


def load_torch_reference() -> Any:
    """The reference module (its ``Hyper`` and ``serve``; torch is imported only in the
    process ``TorchSide`` starts), or None where torch is not installed."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return None
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)  # the spawned process gets the same path
    import nanogpt_torch_reference

    return nanogpt_torch_reference


def nanogpt_batches(data: Any, seq_len: int, batch_size: int, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """nanoGPT's estimate_loss windows: ``n`` batches of ``batch_size`` random windows of the
    validation split, batch k's offsets from ``np.random.default_rng([seed, k])``."""
    out = []
    for k in range(n):
        starts = np.random.default_rng([seed, k]).integers(0, len(data.val) - seq_len, size=batch_size)
        out.append(data.val.windows(starts, seq_len + 1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/tinyshakespeare/input.txt")
    p.add_argument("--experiment", default="shakespeare_char")
    p.add_argument("--reps", type=int, default=3, help="turns of each side (default 3)")
    p.add_argument("--iters", type=int, default=200, help="iterations per turn (default 200)")
    p.add_argument("--warmup", type=int, default=10, help="untimed iterations of each side first (default 10)")
    p.add_argument("--eval-iters", type=int, default=20, help="nanoGPT's eval_iters for its estimate (default 20)")
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--no-torch", action="store_true", help="lmstack alone")
    p.add_argument("--workdir", default="", help="default: a fresh temporary directory")
    args, overrides = p.parse_known_args()
    if args.reps < 1 or args.iters < 1 or args.warmup < 0:
        p.error("--reps and --iters must be >= 1 and --warmup >= 0")

    import lmstack  # noqa: F401  (lmstack's XLA:CPU defaults, set before jax starts)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    import jax

    from lmstack.config import load_config
    from lmstack.perf import measure_matmul_flops

    cfg = load_config(args.experiment, [f"--config.data.path={args.data}", "--config.train.progress=false",
                                        *overrides])
    load = os.getloadavg()
    ours = LmstackSide(cfg, args.workdir or tempfile.mkdtemp(prefix="bench-"))
    cfg = ours.cfg
    sides: list[Any] = [ours]
    ref = None if args.no_torch else load_torch_reference()
    if ref is None:
        why = "--no-torch" if args.no_torch else "torch is not installed"
        print(f"PyTorch side not run ({why}): lmstack's figures alone; pip install -e '.[bench]' to compare")
    else:
        hyper, lacks = torch_hyper(ref, cfg)
        if len(ours.data.train.doc_starts) > 1 or len(ours.data.val.doc_starts) > 1:
            lacks.append("several documents (the reference attends across their boundaries)")
        if lacks:
            print(f"PyTorch side not run: the reference lacks {', '.join(lacks)}: lmstack's figures alone")
        else:
            sides.append(TorchSide(hyper, ours.data.train.tokens, ours.run.spec.vocab_size, cfg.train.seed,
                                   args.torch_threads))

    seq, batch = cfg.data.seq_len, cfg.train.batch_size
    peaks = [measure_matmul_flops("float32", n=1024)]
    compile_s = ours.train(1) if args.warmup else None  # the first step compiles
    ours.train(max(args.warmup - 1, 0))
    for side in sides[1:]:
        side.train(args.warmup)
    times: dict[str, list[float]] = {s.name: [] for s in sides}
    for r in range(args.reps):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            times[side.name].append(side.train(args.iters) / args.iters)
            peaks.append(measure_matmul_flops("float32", n=1024))
    load_after = os.getloadavg()

    whole = ours.run.objective.eval_batches(ours.data)
    sampled = nanogpt_batches(ours.data, seq, batch, args.eval_iters, args.eval_seed)
    fpt = ours.run.model_cfg.flops_per_token(seq)
    peak = statistics.median(peaks)
    n_iters = args.warmup + args.reps * args.iters

    def column(side: Any) -> list[str]:
        ms = statistics.median(times[side.name])
        tps = batch * seq / ms
        return [f"{1e3 * ms:.1f}", " ".join(f"{1e3 * t:.1f}" for t in times[side.name]), f"{tps:,.0f}",
                f"{100 * fpt * tps / peak:.1f}%", f"{side.loss(whole):.4f}", f"{side.loss(sampled):.4f}"]

    names = ["ms/iter (median)", "  each repetition", "tokens/s", "MFU", "val loss, whole split",
             f"val loss, nanoGPT estimate ({args.eval_iters} x {batch})"]
    cols = [column(s) for s in sides]
    mesh = " ".join(f"{k}={v}" for k, v in ours.run.mesh.shape.items())
    m = cfg.model
    from lmstack.perf import cpu_name

    print(f"\nmachine      {os.cpu_count()}-core {cpu_name()}; load average {load[0]:.2f} before, "
          f"{load_after[0]:.2f} after (1 min)")
    print(f"lmstack      jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s), mesh {mesh}, "
          f"{m.dtype}, scan_unroll {m.scan_unroll}, remat {m.remat}, compile + first step {compile_s or 0:.1f} s")
    if len(sides) > 1:
        print(f"PyTorch      torch {sides[1].version}, {sides[1].threads} threads, eager, float32, "
              f"in a process of its own")
    print(f"config       {args.experiment}: {m.n_layers} layers, d={m.d_model}, {m.n_heads} heads, block {seq}, "
          f"batch {batch}; {args.warmup} warmup + {args.reps} x {args.iters} iterations each side, alternating; "
          f"losses at iteration {n_iters}")
    print(f"matmul peak  {peak / 1e9:.0f} GFLOP/s median (XLA fp32 1024^3, {len(peaks)} readings "
          f"{min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f}); model {fpt:,.0f} FLOPs/token (6N + attention)")
    w = max(len(n) for n in names)
    print(f"\n{'':<{w}}  " + "  ".join(f"{s.name:<24}" for s in sides))
    for i, name in enumerate(names):
        print(f"{name:<{w}}  " + "  ".join(f"{c[i]:<24}" for c in cols))
    if len(sides) > 1:
        ratios = [b / a for a, b in zip(times["lmstack"], times["PyTorch"])]
        print(f"\nspeed ratio lmstack / PyTorch (> 1: lmstack faster): {statistics.median(ratios):.2f} "
              f"(per repetition: {' '.join(f'{x:.2f}' for x in ratios)})")
        sides[1].close()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
