"""lmstack's XLA:CPU defaults: one device per core, no YNN fusions, patient collectives, never over the
user's flags."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from lmstack import cpu_defaults


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "--xla_force_host_platform_device_count={cores} --xla_cpu_experimental_ynn_fusion_type="
             " --xla_cpu_collective_call_terminate_timeout_seconds=600"),
        ({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"},
         "--xla_force_host_platform_device_count=3 --xla_cpu_experimental_ynn_fusion_type="
         " --xla_cpu_collective_call_terminate_timeout_seconds=600"),
        ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot --xla_cpu_collective_call_terminate_timeout_seconds=5"},
         "--xla_cpu_experimental_ynn_fusion_type=dot --xla_cpu_collective_call_terminate_timeout_seconds=5"
         " --xla_force_host_platform_device_count={cores}"),
        ({"LMSTACK_XLA_DEFAULTS": "0"}, None),
    ],
)
def test_defaults_fill_in_only_what_the_user_left_unset(monkeypatch, env, expected):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("LMSTACK_XLA_DEFAULTS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cpu_defaults.apply()
    got = os.environ.get("XLA_FLAGS")
    assert got == (None if expected is None else expected.format(cores=cpu_defaults.cpu_cores()))


def test_a_fresh_process_gets_one_cpu_device_per_core():
    code = "import lmstack, jax; print(jax.device_count(), lmstack.cpu_defaults.cpu_cores())"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    devices, cores = map(int, out.stdout.split())
    assert devices == cores


FAULTS_OF_A_REUSED_BLOCK = """
import ctypes, ctypes.util, resource, sys
from lmstack import cpu_defaults
print(cpu_defaults.keep_freed_memory())
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 256 << 20
p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)  # a step's temporaries, then freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)  # the next step's
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _thp_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@pytest.mark.skipif(_thp_always(), reason="huge pages for every mapping: glibc's default faults 2 MiB at a time")
def test_a_freed_large_block_stays_mapped_for_the_next_step():
    """After keep_freed_memory() a 256 MiB block freed and allocated again is not faulted in
    again page by page (65,536 pages of 4 KiB); with the user's own MALLOC_MMAP_MAX_ it is not
    applied and glibc's default stays."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LMSTACK_XLA_DEFAULTS")}

    def run(e):
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REUSED_BLOCK], capture_output=True, text=True,
                             env=e, check=True).stdout.split()
        return out[0] == "True", int(out[1])

    (applied, kept), (skipped, default) = run(env), run({**env, "MALLOC_MMAP_MAX_": "65536"})
    assert applied and not skipped
    assert default > 60_000  # mmap'd, unmapped at free, faulted in again
    assert kept < 2_000
