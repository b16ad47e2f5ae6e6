"""Peak FLOP/s of the device, for MFU: datasheet numbers for accelerators, a measured
matmul rate for CPUs (there is no datasheet number that means anything for a shared CPU)."""

from __future__ import annotations

import functools
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense (no sparsity) peak FLOP/s per chip, by dtype, matched as a substring of
# ``device_kind`` in this order (the PCIe H100 before the SXM one that "H100" means).
DATASHEET = {
    "H100 PCIe": {"bfloat16": 756e12, "float32": 51e12},
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
}


def measure_matmul_flops(dtype: str = "float32", n: int = 1024, repeats: int = 10) -> float:
    """Median FLOP/s of an n x n x n matmul on the default device."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(times))


@functools.cache
def peak_flops(dtype: str = "float32") -> float:
    """Peak FLOP/s of one device of the default backend for ``dtype`` (all local devices
    together on CPU, where the fake devices share the same cores)."""
    kind = jax.devices()[0].device_kind
    for name, rates in DATASHEET.items():
        if name.lower() in kind.lower():
            return rates.get(dtype, rates["float32"])
    return measure_matmul_flops(dtype)


def mfu(flops_per_token: float, tokens_per_second: float, dtype: str) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
    n = 1 if jax.default_backend() == "cpu" else jax.device_count()
    return flops_per_token * tokens_per_second / (peak_flops(dtype) * n)


def train_step_flops(cfg, workdir) -> float:
    """FLOPs of one compiled train step of ``cfg`` by XLA's cost analysis: counts what the
    step really computes, whatever the model family and objective."""
    from pathlib import Path

    from lmstack.run import Run

    run, data = Run.for_training(cfg, Path(workdir) / cfg.name)
    step = run.train_step()
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in next(run.objective.train_batches(data)).items()}
    with jax.set_mesh(run.mesh):
        cost = step.lower(run.abstract, batch, jax.random.key(0)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``), for benchmark tables; the
    platform's processor string where that file is absent."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
