"""Mesh layouts for common machines: the sizes of ``config.mesh`` (axes ``data``, ``fsdp``,
``tensor``; see lmstack.sharding). Parameters and optimizer state are sharded over ``fsdp``
(ZeRO-3 style) inside a fast interconnect (NVLink, TPU ICI); ``data`` replicates across
slower links (between hosts over the network). ``lmstack compile NAME --topology T``
checks a TPU layout's memory before a pod is booked."""

from __future__ import annotations

from typing import Callable

import ml_collections as mlc


def _mesh(c: mlc.ConfigDict, data: int, fsdp: int, tensor: int = 1) -> None:
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor


def one_gpu(c: mlc.ConfigDict) -> None:
    """One accelerator: no sharding."""
    _mesh(c, 1, 1)


def h100x8(c: mlc.ConfigDict) -> None:
    """One 8-GPU host (8x H100 over NVLink): fully sharded over the 8."""
    _mesh(c, 1, 8)


def h100x8x2(c: mlc.ConfigDict) -> None:
    """Two 8-GPU hosts: fully sharded within each host, data parallel across the two."""
    _mesh(c, 2, 8)


def tpu_v5e_256(c: mlc.ConfigDict) -> None:
    """A TPU v5e-256 slice (256 chips, 16x16 ICI torus): fully sharded over all chips (16 GiB each)."""
    _mesh(c, 1, 256)


def tpu_v5p_128(c: mlc.ConfigDict) -> None:
    """A TPU v5p-128 slice (64 chips, 4x4x4; v5p-N counts TensorCores): fully sharded over the 64."""
    _mesh(c, 1, 64)


MESHES: dict[str, Callable[[mlc.ConfigDict], None]] = {
    "one-gpu": one_gpu,
    "h100x8": h100x8,
    "h100x8x2": h100x8x2,
    "v5e-256": tpu_v5e_256,
    "v5p-128": tpu_v5p_128,
}
