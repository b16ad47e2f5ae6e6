"""XLA:CPU defaults that lmstack sets before jax creates its backend (and one for glibc's
allocator that a run on CPU devices sets).

- **One device per core.** XLA:CPU parallelises each operation over the cores, which
  pays off for large matrices but not for the small ones of CPU-sized models, where
  synchronising threads for every operation dominates. lmstack instead splits the host
  into one JAX device per core, so a mesh with ``data=-1`` runs data parallel over the
  cores, each device working through its share of the batch on its own
  (nanoGPT benchmark on 2 cores: 46 -> ~36 ms per iteration when measured; a later session
  found one device and two equal within its machine's drift: 50.3, 49.5 vs 50.3, 52.7 ms).
- **No YNN fusions.** XLA:CPU's experimental YNN fusions run these matmuls ~10% slower than
  its default emitters (the same benchmark: 54 -> 48 ms per iteration).
- **Freed memory kept for the next step.** glibc serves large blocks with ``mmap`` and
  returns them with ``munmap`` at ``free``, so memory a step frees is faulted in again, page
  by page, at the next. lmstack asks glibc (``mallopt``) to serve large blocks from its heap
  and never to trim it, as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` would:
  freed pages stay mapped for the next step (the process keeps its peak memory, which the
  next step needs again anyway). Quickstart step, 2 CPU devices, measured beside another
  training run: 241,000 -> 153,000 minor page faults and 0.53 -> 0.34 s of kernel time a step. The rest is XLA:CPU's own block of
  temporaries (298 MB a device), which it maps and unmaps itself at every run of the step.
  Applied when a run is built on CPU devices (never on a GPU/TPU host, whose large host
  buffers, loaded checkpoints say, should go back to the system), skipped where the C
  library is not glibc or the user set either variable or a ``glibc.malloc.`` tunable.
- **Patient collectives.** The devices of one host share its cores, so on a busy machine
  one device can reach an all-reduce long after the others; XLA:CPU aborts the process when
  a collective waits more than 40 s (``Termination timeout for all reduce``, seen on this
  2-core machine at load 10-18). lmstack waits up to 10 minutes instead.
- **One step in flight.** With several CPU devices, XLA:CPU (jaxlib 0.10.2) deadlocks when
  many computations holding a collective are queued without waiting for any: a jitted
  all-reduce called 80 times in a row never returns (40 times does; XLA's own flags too).
  In gdb, one device's thread waits in the all-reduce for the other device, whose launch
  waits for a free slot among its in-flight computations. lmstack's train loop waits for each step's result on
  CPU meshes of more than one device. Letting one step queue behind the running one was no
  faster on 2 cores (Shakespeare step, alternating turns: 53.8 and 56.4 ms against 51.4 and
  49.8): the host's work for the next step takes its CPU time from a device either way.

Each default applies only where the user has not set the same flag in ``XLA_FLAGS``
(``JAX_NUM_CPU_DEVICES``, where set, overrides the device count in any case);
``LMSTACK_XLA_DEFAULTS=0`` keeps XLA's own choices. They take effect only if lmstack is
imported before jax creates its backend (the ``lmstack`` command and the tools do so).
"""

from __future__ import annotations

import ctypes
import os

_DEVICE_COUNT = "--xla_force_host_platform_device_count"
_YNN_FUSIONS = "--xla_cpu_experimental_ynn_fusion_type"
_COLLECTIVE_TIMEOUT = "--xla_cpu_collective_call_terminate_timeout_seconds"
# glibc's mallopt parameters (malloc.h) and the environment variables that set them at start
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


def cpu_cores() -> int:
    """Cores this process may run on (respects CPU affinity and container limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from its heap and never trim it (see the module
    docstring); a :class:`lmstack.run.Run` on CPU devices calls it. True if it did, False where
    the C library is not glibc, a mallopt call failed, ``LMSTACK_XLA_DEFAULTS=0``, or the user
    set ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` or a ``glibc.malloc.`` tunable."""
    if (os.environ.get("LMSTACK_XLA_DEFAULTS", "1") == "0" or any(v in os.environ for v in _MALLOC_ENV)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own C library
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: mallopt's parameters are its own)
    except (OSError, AttributeError, TypeError):
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def apply() -> None:
    if os.environ.get("LMSTACK_XLA_DEFAULTS", "1") == "0":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    extra = []
    if _DEVICE_COUNT not in flags:
        extra.append(f"{_DEVICE_COUNT}={cpu_cores()}")
    if _YNN_FUSIONS not in flags:
        extra.append(f"{_YNN_FUSIONS}=")
    if _COLLECTIVE_TIMEOUT not in flags:
        extra.append(f"{_COLLECTIVE_TIMEOUT}=600")
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
