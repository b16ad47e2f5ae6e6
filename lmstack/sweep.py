"""Sweeps: an experiment's ``sweep()`` lists override sets; each becomes one run of it.

An experiment may define ``sweep()`` returning a list of members, each a mapping
``{"optimizer.lr": 1e-3, ...}`` (keys may also be written ``--config.optimizer.lr`` or, as
keyword arguments, ``optimizer__lr``) or a list of ``--config.a.b=v`` strings. The helpers
build such lists deterministically::

    grid(**{"optimizer.lr": [3e-4, 1e-3], "train.seed": [0, 1]})      # 4 members, last axis fastest
    random(8, seed=0, optimizer__lr=log_uniform(1e-4, 1e-2), model__dropout=choice(0.0, 0.1))

Member names come from their overrides alone: ``KEY=VALUE`` pairs joined by commas in the
order given, KEY being the last component of the dotted key (the whole key where two
overrides share it), VALUE as passed to ``--config`` (floats in Python's shortest repr),
characters outside ``A-Za-z0-9._=,+@-`` replaced by ``_``, ``base`` for no overrides. A name
longer than 80 characters, or one two members share, keeps its first 60 characters and gets
``-`` and 8 hex digits of the SHA-1 of the member's overrides. So re-running a sweep finds its
members again: ``lmstack sweep`` puts member M in ``WORKDIR/M`` (``WORKDIR`` defaults to
``runs/NAME``) with its overrides in ``WORKDIR/M/overrides.json``; a member whose checkpoint
at ``train.steps`` exists is finished and skipped, any other one runs ``lmstack train``, which
resumes from its latest checkpoint.

Launchers: ``local`` runs the members as ``lmstack train`` subprocesses (``--parallel N`` at
once, each one's output in ``WORKDIR/M/train.log``); ``slurm`` writes ``WORKDIR/sweep.sbatch``,
an array job with one task per member; ``tpu-vm`` writes ``WORKDIR/sweep_tpu_vm.sh``, one
``gcloud compute tpus tpu-vm ssh --worker=all`` line per member, run one after another on the
whole slice. Every member's config is loaded and validated before anything launches.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

import lmstack
from lmstack import config as config_lib
from lmstack.config import ConfigError
from lmstack.registry import UnknownNameError

LAUNCHERS = ("local", "slurm", "tpu-vm")
_MAX_NAME = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@-]")


# ----------------------------------------------------------------------------- search spaces


@dataclass(frozen=True)
class Distribution:
    """A random-search axis: ``draw(rng)`` gives one value from a numpy Generator."""

    draw: Callable[[np.random.Generator], Any]
    text: str

    def __repr__(self) -> str:
        return self.text


def _round(x: float, digits: int | None, lo: float, hi: float) -> float:
    """``x`` to ``digits`` significant digits, kept inside [lo, hi]."""
    return float(x) if digits is None else min(max(float(f"{x:.{digits}g}"), lo), hi)


def log_uniform(lo: float, hi: float, digits: int | None = 3) -> Distribution:
    """Uniform in log space on [lo, hi] (0 < lo < hi): as many draws per decade anywhere,
    the usual prior for learning rates and weight decays. Draws are rounded to ``digits``
    significant digits (None: full precision), so member names and configs stay readable."""
    if not 0 < lo < hi:
        raise ConfigError(f"log_uniform({lo!r}, {hi!r}): needs 0 < lo < hi")
    return Distribution(lambda rng: _round(math.exp(rng.uniform(math.log(lo), math.log(hi))), digits, lo, hi),
                        f"log_uniform({lo!r}, {hi!r})")


def uniform(lo: float, hi: float, digits: int | None = 3) -> Distribution:
    """Uniform on [lo, hi] (lo < hi), rounded to ``digits`` significant digits (None: full precision)."""
    if not lo < hi:
        raise ConfigError(f"uniform({lo!r}, {hi!r}): needs lo < hi")
    return Distribution(lambda rng: _round(rng.uniform(lo, hi), digits, lo, hi), f"uniform({lo!r}, {hi!r})")


def choice(*values: Any) -> Distribution:
    """One of ``values``, each equally likely."""
    if not values:
        raise ConfigError("choice(): give at least one value")
    return Distribution(lambda rng: values[int(rng.integers(len(values)))], f"choice{values!r}")


def _key(name: str) -> str:
    """A dotted config key from ``optimizer.lr``, ``--config.optimizer.lr`` or ``optimizer__lr``."""
    for prefix in ("--config.", "config."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace("__", ".")


def _axes(axes: Mapping[str, Any] | None, kw: Mapping[str, Any]) -> dict[str, Any]:
    return {_key(k): v for k, v in {**(axes or {}), **kw}.items()}


def grid(axes: Mapping[str, Any] | None = None, /, **kw: Any) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the last axis varying fastest (itertools.product).

    Axes are ``key=[values]``, keys dotted (``**{"optimizer.lr": [...]}``, a mapping passed
    first, or ``optimizer__lr=[...]``). Raises ConfigError for an axis that is not a list or tuple."""
    axes = _axes(axes, kw)
    for key, values in axes.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"grid axis {key!r} is {values!r}: give a non-empty list of values")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def random(n: int, seed: int, axes: Mapping[str, Any] | None = None, **kw: Any) -> list[dict[str, Any]]:
    """``n`` members drawn with ``numpy.random.default_rng(seed)``: member by member, axis by axis
    in the order given, so the same seed gives the same list. An axis is a Distribution
    (:func:`log_uniform`, :func:`uniform`, :func:`choice`) or a constant."""
    axes = _axes(axes, kw)
    rng = np.random.default_rng(seed)
    return [{k: d.draw(rng) if isinstance(d, Distribution) else d for k, d in axes.items()} for _ in range(n)]


# ----------------------------------------------------------------------------- members


def override_value(value: Any) -> str:
    """``value`` as written after ``--config.KEY=``: booleans true/false, strings as they are,
    other values in Python's repr (floats shortest round-trip, tuples as ``('a', 'b')``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else repr(value)


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """``--config.KEY=VALUE`` flags for ``overrides`` (see :func:`override_value`)."""
    return [f"--config.{k}={override_value(v)}" for k, v in overrides.items()]


@dataclass(frozen=True)
class Member:
    """One run of a sweep: its name, overrides (dotted key -> value), directory and length."""

    name: str
    overrides: dict[str, Any]
    workdir: str
    steps: int

    @property
    def args(self) -> list[str]:
        return override_args(self.overrides)

    def finished(self) -> bool:
        """Whether the run's checkpoint at ``train.steps`` exists (orbax names step dirs by number)."""
        return (Path(self.workdir) / "checkpoints" / str(self.steps)).is_dir()


def _as_overrides(member: Any, index: int) -> dict[str, Any]:
    if isinstance(member, Mapping):
        return {_key(str(k)): v for k, v in member.items()}
    if isinstance(member, (list, tuple)) and all(isinstance(s, str) for s in member):
        out = {}
        for text in member:
            key, eq, raw = text.partition("=")
            if not eq or not key.startswith(("--config.", "config.")):
                raise ConfigError(f"sweep member #{index}: {text!r} is not of the form --config.KEY=VALUE")
            out[_key(key)] = raw
        return out
    raise ConfigError(f"sweep member #{index} is {member!r}: give a mapping {{'optimizer.lr': 1e-3}} "
                      f"or a list of '--config.KEY=VALUE' strings")


def member_name(overrides: Mapping[str, Any]) -> str:
    """The readable part of a member's name (see the module docstring); no hash suffix."""
    lasts = [k.rpartition(".")[2] for k in overrides]
    parts = [f"{last if lasts.count(last) == 1 else k}={override_value(v)}"
             for k, last, v in zip(overrides, lasts, overrides.values())]
    return _UNSAFE.sub("_", ",".join(parts)) or "base"


def _digest(overrides: Mapping[str, Any]) -> str:
    text = json.dumps({k: override_value(v) for k, v in overrides.items()}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def member_names(members: Sequence[Mapping[str, Any]]) -> list[str]:
    """Unique names for ``members`` (see the module docstring). Raises ConfigError for two
    members with the same overrides."""
    seen: dict[str, int] = {}
    for i, m in enumerate(members):
        key = json.dumps({k: override_value(v) for k, v in m.items()}, sort_keys=True)
        if key in seen:
            raise ConfigError(f"sweep members #{seen[key]} and #{i} have the same overrides {dict(m)}: "
                              f"drop one")
        seen[key] = i
    names = [member_name(m) for m in members]
    return [f"{n[:60]}-{_digest(m)}" if len(n) > _MAX_NAME or names.count(n) > 1 else n
            for n, m in zip(names, members)]


@dataclass(frozen=True)
class Sweep:
    """An experiment's validated sweep: ``spec`` (NAME or NAME:arg), the overrides every member
    shares (``common``, as ``--config.a.b=v``), the sweep directory and its members."""

    spec: str
    common: list[str]
    workdir: str
    members: list[Member]

    def train_args(self, member: Member) -> list[str]:
        """The arguments after ``lmstack`` that train ``member``."""
        return ["train", self.spec, "--workdir", member.workdir, *self.common, *member.args]


def load_sweep(spec: str, common: Sequence[str] = (), workdir: str | None = None) -> Sweep:
    """Read ``sweep()`` of experiment ``spec`` (``NAME`` or ``NAME:arg``) and load every member's
    config (``common`` overrides, then the member's) through :func:`lmstack.config.load_config`,
    checking it against a run already in the member's directory. Nothing is written.

    Raises ConfigError naming the member for any invalid member, for an experiment without
    ``sweep()``, or for a ``common`` override of a key that a member sets."""
    name = spec.partition(":")[0]
    module = config_lib.import_experiment(name)
    source = Path(module.__file__).name
    sweep_fn = getattr(module, "sweep", None)
    if not callable(sweep_fn):
        raise ConfigError(f"experiment {name!r} ({source}) defines no sweep(): add one returning e.g. "
                          f"grid(**{{'optimizer.lr': [1e-3, 3e-3]}}) from lmstack.sweep")
    raw = sweep_fn()
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ConfigError(f"{source}: sweep() returned {raw!r}: return a non-empty list of override mappings")
    overrides = [_as_overrides(m, i) for i, m in enumerate(raw)]
    common = list(common)
    common_keys = {_key(t.partition("=")[0]): t for t in common}
    workdir = str(workdir or Path("runs") / name)
    members = []
    for i, (label, ov) in enumerate(zip(member_names(overrides), overrides)):
        clash = next((k for k in ov if k in common_keys), None)
        if clash:
            raise ConfigError(f"sweep member {label!r} sets {clash}, which {common_keys[clash]} also sets: "
                              f"drop the flag or the axis")
        member_dir = f"{workdir}/{label}"
        try:
            cfg = config_lib.load_config(spec, [*common, *override_args(ov)])
            config_lib.check_resume(cfg, member_dir)
        except (ConfigError, UnknownNameError) as e:
            raise ConfigError(f"sweep member {label!r} (#{i} of {source}'s sweep()): "
                              f"{str(e).splitlines()[0]}") from None
        members.append(Member(label, ov, member_dir, int(cfg.train.steps)))
    return Sweep(spec, common, workdir, members)


def write_overrides(sweep: Sweep) -> None:
    """Each member's ``overrides.json``: the experiment, the member's overrides and the shared flags."""
    for m in sweep.members:
        path = Path(m.workdir) / "overrides.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"experiment": sweep.spec, "member": m.name, "overrides": m.overrides, "common": sweep.common}
        path.write_text(json.dumps(record, indent=1, default=list) + "\n")


# ----------------------------------------------------------------------------- launchers


def _child_env() -> dict[str, str]:
    """The environment with this lmstack first on PYTHONPATH, so members run the same code."""
    root = str(Path(lmstack.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, path) if p), "PYTHONUNBUFFERED": "1"}


def run_local(sweep: Sweep, parallel: int = 1, dry_run: bool = False,
              say: Callable[[str], None] = print) -> list[str]:
    """Run the unfinished members as ``python -m lmstack.cli train`` subprocesses, ``parallel``
    at a time, each one's output appended to its ``train.log``; returns the names of members
    that failed or stopped early (interrupted). ``dry_run`` prints the commands and runs nothing."""
    if parallel < 1:
        raise ConfigError(f"--parallel={parallel}: must be at least 1")
    n = len(sweep.members)
    todo = []
    for i, m in enumerate(sweep.members, 1):
        if m.finished():
            say(f"[{i}/{n}] {m.name}: finished (checkpoint at step {m.steps}), skipped")
        elif dry_run:
            say(f"[{i}/{n}] {m.name}: lmstack {shlex.join(sweep.train_args(m))}")
        else:
            todo.append((i, m))
    if dry_run or not todo:
        return []
    write_overrides(sweep)
    env = _child_env()

    def launch(item: tuple[int, Member]) -> str | None:
        """Run one member; its name if it failed or stopped before its last step."""
        i, m = item
        log = Path(m.workdir) / "train.log"
        say(f"[{i}/{n}] {m.name}: running (output in {log})")
        start = time.perf_counter()
        with open(log, "a") as f:
            rc = subprocess.run([sys.executable, "-m", "lmstack.cli", *sweep.train_args(m)],
                                stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        if rc == 0 and m.finished():
            say(f"[{i}/{n}] {m.name}: done in {time.perf_counter() - start:.1f}s")
            return None
        if rc == 0:  # a signalled run saves a checkpoint and exits cleanly
            say(f"[{i}/{n}] {m.name}: stopped before step {m.steps} (interrupted); re-run the sweep to resume it")
            return m.name
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        say(f"[{i}/{n}] {m.name}: FAILED (exit {rc}): {tail[0]}")
        return m.name

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=parallel)
    try:
        return [name for name in pool.map(launch, todo) if name is not None]
    except KeyboardInterrupt:  # the running members got the same SIGINT: they save a checkpoint and exit
        pool.shutdown(wait=True, cancel_futures=True)  # and no further member starts
        say("interrupted: re-run the sweep to resume")
        return [m.name for _, m in todo if not m.finished()]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def slurm_script(sweep: Sweep) -> str:
    """An sbatch array script: task ``SLURM_ARRAY_TASK_ID`` trains member number that (0-based,
    in sweep() order) and exits at once if the member is finished."""
    name = sweep.spec.partition(":")[0]
    lines = [
        "#!/bin/bash",
        f"# lmstack sweep {sweep.spec}: {len(sweep.members)} members, one array task each.",
        f"# Submit: sbatch {sweep.workdir}/sweep.sbatch   (add your partition, time and GPU options below)",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --array=0-{len(sweep.members) - 1}",
        f"#SBATCH --output={sweep.workdir}/slurm-%A_%a.out",
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    for i, m in enumerate(sweep.members):
        lines.append(f"  {i}) MEMBER={shlex.quote(m.name)}; STEPS={m.steps}; "
                     f"ARGS=({' '.join(map(shlex.quote, m.args))}) ;;")
    lines += [
        '  *) echo "no sweep member $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;',
        "esac",
        f'W={shlex.quote(sweep.workdir)}/"$MEMBER"',
        'if [ -d "$W/checkpoints/$STEPS" ]; then echo "$MEMBER: finished"; exit 0; fi',
        f'exec lmstack train {shlex.quote(sweep.spec)} --workdir "$W" '
        f'{" ".join(map(shlex.quote, sweep.common))}{" " if sweep.common else ""}"${{ARGS[@]}}"',
    ]
    return "\n".join(lines) + "\n"


def tpu_vm_commands(sweep: Sweep, tpu_name: str | None, zone: str | None) -> str:
    """A shell script of ``gcloud compute tpus tpu-vm ssh TPU --zone ZONE --worker=all
    --command "lmstack train ... --coordinator auto"`` lines, one per member, run one after
    another on the whole slice, every worker a process of one job (jax reads the slice from the
    TPU metadata). The command runs in each worker's home directory: lmstack must be installed there,
    and the workdir one every worker sees (a shared mount such as NFS or gcsfuse: pass it
    as ``--workdir``). Raises ConfigError without ``tpu_name`` or ``zone``."""
    if not tpu_name or not zone:
        raise ConfigError("--launcher tpu-vm needs --tpu-name and --zone: the TPU VM slice to run the members on")
    lines = ["#!/bin/bash", f"# lmstack sweep {sweep.spec}: {len(sweep.members)} members on TPU VM {tpu_name}, "
             "one after another, each on all workers.", "set -euo pipefail"]
    for m in sweep.members:
        command = shlex.join(["lmstack", *sweep.train_args(m), "--coordinator", "auto"])
        lines.append(shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, "--zone", zone,
                                 "--worker=all", "--command", command]))
    return "\n".join(lines) + "\n"


def launch(sweep: Sweep, launcher: str, *, parallel: int = 1, dry_run: bool = False,
           tpu_name: str | None = None, zone: str | None = None, say: Callable[[str], None] = print) -> list[str]:
    """Run or write ``sweep`` with ``launcher`` (local, slurm, tpu-vm); ``dry_run`` prints what
    would run or be written and writes nothing. Returns the names of members that did not
    finish (local)."""
    if launcher == "local":
        return run_local(sweep, parallel, dry_run, say)
    if launcher == "slurm":
        text, path = slurm_script(sweep), Path(sweep.workdir) / "sweep.sbatch"
    elif launcher == "tpu-vm":
        text, path = tpu_vm_commands(sweep, tpu_name, zone), Path(sweep.workdir) / "sweep_tpu_vm.sh"
    else:
        raise ConfigError(f"unknown launcher {launcher!r}: one of {', '.join(LAUNCHERS)}")
    if dry_run:
        say(text.rstrip("\n"))
        return []
    write_overrides(sweep)
    path.write_text(text)
    path.chmod(0o755)
    say(f"wrote {path} ({len(sweep.members)} members): "
        + (f"sbatch {path}" if launcher == "slurm" else f"bash {path}"))
    return []
