"""Test setup: 8 fake CPU devices, created before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# The suite's time goes into compiling many small programs, not running them: XLA:CPU's LLVM
# backend without its optimisation passes compiles a train step in under half the time, while the
# programs (same HLO, same partitioning, IEEE arithmetic without fast-math) compute the same
# numbers within every test's tolerance. Subprocesses inherit it; a flag set by the caller wins.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("LMSTACK_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache-test"))

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=f"{SHARED_DATA} is absent")
    for item in items:
        if "shared_data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> pathlib.Path:
    return SHARED_DATA
