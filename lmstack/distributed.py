"""Jobs of several processes (multi-host): who takes part, who writes, which batch rows each reads.

A job has several processes when it is told so, in this order:

- **Flags** ``--coordinator HOST:PORT --num-processes N --process-id I`` (``lmstack train``
  and ``eval``): all three, or none. ``--coordinator auto`` leaves every value to
  ``jax.distributed.initialize()``'s own cluster detection (Cloud TPU VM metadata on a TPU
  pod slice, GKE, SLURM, Open MPI), so on a TPU pod each worker runs the same command with
  ``--coordinator auto``.
- **SLURM**, when ``SLURM_NTASKS`` > 1 (``srun`` with several tasks): the process id is
  ``SLURM_PROCID``, the coordinator the first host of ``SLURM_STEP_NODELIST`` (or
  ``SLURM_JOB_NODELIST``) on port ``61440 + SLURM_JOB_ID % 4096``, the rule jax's
  ``SlurmCluster`` uses. With more than one task per node (``SLURM_NTASKS`` over
  ``SLURM_STEP_NUM_NODES``/``SLURM_NNODES``) each task sees only accelerator
  ``SLURM_LOCALID``, one process per GPU as jax's own detection does.
- Otherwise a single process, and ``jax.distributed`` is not started.

A half-set environment (a flag without the others, SLURM task count without a task id) is a
one-line :class:`~lmstack.config.ConfigError` naming what is missing.

Every process builds the same run, runs the same compiled steps and takes part in every
checkpoint save and restore (orbax writes each process's shards; grain writes each
process's iterator state as ``process_I-of-N.json``); only process 0 writes logs, prints
and the workdir's config and spec files (:func:`is_primary`). Each process reads only its
rows of each global batch (:func:`process_rows`) and :func:`global_batch` assembles the
rows of all processes into one ``jax.Array``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding

from lmstack.config import ConfigError

AUTO = "auto"
_SLURM_PORT_BASE = 65535 - 2**12 + 1  # jax SlurmCluster: an ephemeral port from the job id


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """How this process takes part in the job. ``source``: ``"single"``, ``"flags"``,
    ``"slurm"`` or ``"auto"`` (jax's detection; then the other fields may be None)."""

    source: str
    num_processes: int | None = 1
    process_id: int | None = 0
    coordinator: str | None = None
    local_device_ids: tuple[int, ...] | None = None

    @property
    def multi_process(self) -> bool:
        return self.source != "single"


def process_info(args: Any = None, env: Mapping[str, str] | None = None) -> ProcessInfo:
    """Decide from the CLI flags (``args.coordinator``, ``args.num_processes``,
    ``args.process_id``; missing attributes count as unset) and then ``env`` (default
    ``os.environ``) whether the job has several processes; no side effects.

    Raises ConfigError for a half-set flag group or SLURM environment, or values out of range."""
    env = os.environ if env is None else env
    flags = {"--coordinator": getattr(args, "coordinator", None),
             "--num-processes": getattr(args, "num_processes", None),
             "--process-id": getattr(args, "process_id", None)}
    if flags["--coordinator"] == AUTO:
        return ProcessInfo("auto", flags["--num-processes"], flags["--process-id"], None)
    if any(v is not None for v in flags.values()):
        missing = [k for k, v in flags.items() if v is None]
        if missing:
            given = " ".join(f"{k} {v}" for k, v in flags.items() if v is not None)
            raise ConfigError(f"{given} needs {' and '.join(missing)} too: pass all of --coordinator HOST:PORT "
                              f"--num-processes N --process-id I (or --coordinator auto on a TPU pod)")
        return _checked("flags", flags["--coordinator"], flags["--num-processes"], flags["--process-id"],
                        "--num-processes", "--process-id", "--coordinator")
    if _int_env(env, "SLURM_NTASKS", 1) > 1:
        return _from_slurm(env)
    return ProcessInfo("single")


def initialize_from(args: Any = None, env: Mapping[str, str] | None = None) -> ProcessInfo:
    """:func:`process_info`, then ``jax.distributed.initialize`` for a job of several
    processes. Call it before anything else uses jax (before the backend starts)."""
    info = process_info(args, env)
    if info.source == "auto":
        jax.distributed.initialize(num_processes=info.num_processes, process_id=info.process_id)
    elif info.multi_process:
        jax.distributed.initialize(info.coordinator, num_processes=info.num_processes, process_id=info.process_id,
                                   local_device_ids=info.local_device_ids, cluster_detection_method="deactivate")
    return info


def is_primary() -> bool:
    """Whether this is process 0, the one that writes logs, prints and the workdir's files."""
    return jax.process_index() == 0


def process_rows(sharding: NamedSharding, global_rows: int) -> slice:
    """The rows ``[start, stop)`` of a ``global_rows``-row batch laid out by ``sharding`` (split
    on its leading dimension) that this process's devices hold; ``slice(0, global_rows)`` for
    one process. Raises ConfigError if they are not one contiguous block (a mesh whose device
    order interleaves processes on the batch axes)."""
    indices = sharding.addressable_devices_indices_map((global_rows,) + (1,) * (len(sharding.spec) - 1))
    rows = sorted({(ix[0].start or 0, global_rows if ix[0].stop is None else ix[0].stop) for ix in indices.values()})
    start, stop = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != stop - start:
        raise ConfigError(f"process {jax.process_index()} holds batch rows {rows} of {global_rows}: not one block; "
                          f"order the mesh's devices by process (config.mesh)")
    return slice(start, stop)


def global_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding,
                 global_rows: int | None = None) -> dict[str, jax.Array]:
    """One global ``jax.Array`` per entry, split on its leading (batch) axis like ``sharding``,
    from this process's rows (``jax.make_array_from_process_local_data``).

    ``batch`` holds either this process's rows (:func:`process_rows`) of a ``global_rows``-row
    batch, or the whole global batch (e.g. evaluation batches, which every process builds;
    ``global_rows`` None: the batch's own row count), of which this process's rows are taken.
    Raises ConfigError for any other row count."""
    global_rows = len(next(iter(batch.values()))) if global_rows is None else global_rows
    rows = process_rows(sharding, global_rows)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if len(value) == global_rows:
            value = value[rows]
        elif len(value) != rows.stop - rows.start:
            raise ConfigError(f"batch entry {key!r} has {len(value)} rows: expected the global batch of {global_rows} "
                              f"or this process's rows {rows.start}:{rows.stop}")
        spec = NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(sharding.spec[0], *[None] * (value.ndim - 1)))
        out[key] = jax.make_array_from_process_local_data(spec, value, (global_rows, *value.shape[1:]))
    return out


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (every process must call it); ``flag`` itself for one."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def fetch(tree: Any) -> Any:
    """``tree``'s arrays as numpy on every process, also those sharded over other processes'
    devices (``multihost_utils.process_allgather``; every process must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _from_slurm(env: Mapping[str, str]) -> ProcessInfo:
    needed = ("SLURM_PROCID", "SLURM_JOB_ID")
    missing = [k for k in needed if k not in env]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        missing.append("SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST)")
    if missing:
        raise ConfigError(f"SLURM_NTASKS={env['SLURM_NTASKS']} but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not set: launch each task "
                          f"with srun, or pass --coordinator HOST:PORT --num-processes N --process-id I")
    n = _int_env(env, "SLURM_NTASKS", 1)
    port = _int_env(env, "SLURM_JOB_ID", 0) % 2**12 + _SLURM_PORT_BASE
    coordinator = f"{first_slurm_host(nodelist)}:{port}"
    nodes = _int_env(env, "SLURM_STEP_NUM_NODES", _int_env(env, "SLURM_NNODES", n))
    local = None
    if n > nodes:  # several tasks per node: one accelerator each
        if "SLURM_LOCALID" not in env:
            raise ConfigError(f"SLURM_NTASKS={n} on {nodes} node(s) but SLURM_LOCALID is not set: launch each task "
                              f"with srun")
        local = (_int_env(env, "SLURM_LOCALID", 0),)
    info = _checked("slurm", coordinator, n, _int_env(env, "SLURM_PROCID", 0), "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_STEP_NODELIST")
    return dataclasses.replace(info, local_device_ids=local)


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[001-004,9],gpu2`` -> ``node001``."""
    m = re.match(r"([^,\[]+)(?:\[([^,\-\]]+))?", nodelist.strip())
    if not m:
        raise ConfigError(f"SLURM node list {nodelist!r}: no host name in it")
    return m.group(1) + (m.group(2) or "")


def _checked(source: str, coordinator: str, n: Any, pid: Any, n_key: str, id_key: str, coord_key: str) -> ProcessInfo:
    n, pid = _as_int(n, n_key), _as_int(pid, id_key)
    if n < 1:
        raise ConfigError(f"{n_key}={n}: must be at least 1")
    if not 0 <= pid < n:
        raise ConfigError(f"{id_key}={pid}: must be in [0, {n}) for {n_key}={n}")
    if not re.fullmatch(r"\S+:\d+", str(coordinator)):
        raise ConfigError(f"{coord_key}={coordinator!r}: expected HOST:PORT (e.g. localhost:12345)")
    return ProcessInfo(source, n, pid, str(coordinator))


def _as_int(value: Any, key: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: not an integer") from None


def _int_env(env: Mapping[str, str], key: str, default: int) -> int:
    return _as_int(env[key], key) if key in env else default
