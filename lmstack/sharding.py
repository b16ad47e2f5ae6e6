"""Device mesh from config, logical-axis rules, and the shardings of state and batches.

Parameters and activations name their dimensions logically (``('embed', 'mlp')``); the
rules table below maps each logical name to mesh axes. Changing how a model is sharded is
a change to this table or to ``config.mesh``, never to a model file.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Parameters: fully-sharded data parallel over 'fsdp' on the
# embedding dimension, Megatron-style tensor parallel over 'tensor' on heads / MLP width /
# vocabulary. Activations: the batch is split over both data-parallel axes.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("positions", None),
    ("token_types", None),  # BERT token-type (segment A/B) embedding rows
    ("relpos_buckets", None),  # T5 relative-position bias rows (the table is split on 'heads')
    ("projection", None),  # two-tower projection output: small, kept whole
    ("labels", None),  # classification head output (objective.classify): a few classes, kept whole
    ("value", None),  # a value head's output (objective.ppo): one number, kept whole
    ("norm", None),
    ("layers", None),
    ("lora_rank", None),  # LoRA factors' rank axis: small, kept whole
)


class MeshError(ValueError):
    """A mesh that does not fit the devices or the batch."""


def mesh_shape(mesh_cfg: Any, n_devices: int) -> tuple[int, int, int]:
    """Resolve ``config.mesh`` (``-1`` = the remaining devices) against the device count."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % fixed:
            raise MeshError(
                f"config.mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({fixed} devices) do not "
                f"divide the {n_devices} available devices: choose sizes whose product divides {n_devices}"
            )
        sizes = [n_devices // fixed if s == -1 else s for s in sizes]
    total = math.prod(sizes)
    if total > n_devices:
        raise MeshError(
            f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {total} devices but only {n_devices} "
            f"are available ({jax.default_backend()}): lower --config.mesh.* or use -1 for 'the rest'"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``('data', 'fsdp', 'tensor')`` mesh over the first devices that fit ``config.mesh``."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    grid = np.asarray(devices[: math.prod(shape)]).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def logical_to_spec(names: Sequence[str | None]) -> P:
    """Map logical dimension names to a PartitionSpec with :data:`RULES`."""
    table = dict(RULES)
    return P(*(table.get(n) if n is not None else None for n in names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical names; a no-op outside a mesh context. Inside
    a ``shard_map``, the mesh axes it made manual are left out (each device already holds
    its own block along them)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(names)
    manual = set(mesh.manual_axes)
    if manual:
        spec = P(*(_without(entry, manual) for entry in spec))
    return jax.lax.with_sharding_constraint(x, spec)


def _without(entry: Any, axes: set[str]) -> Any:
    """One PartitionSpec entry (None, an axis name or a tuple of them) less ``axes``."""
    kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a not in axes)
    return kept[0] if len(kept) == 1 else (kept or None)


def state_shardings(abstract_state: nnx.State, mesh: Mesh) -> Any:
    """NamedShardings for an (abstract) nnx state, from each variable's logical names. A
    variable whose value is a pytree of arrays (an NF4-stored weight) has no names for its
    parts: each part is replicated."""
    plain = [(p, v) for p, v in nnx.to_flat_state(abstract_state) if len(jax.tree.leaves(v)) <= 1]
    composite = [(p, v) for p, v in nnx.to_flat_state(abstract_state) if len(jax.tree.leaves(v)) > 1]
    with nnx.logical_axis_rules(RULES):
        shardings = list(nnx.to_flat_state(nnx.get_named_sharding(nnx.from_flat_state(plain), mesh))) if plain else []
    for path, var in composite:
        shardings.append((path, var.replace(jax.tree.map(lambda _: NamedSharding(mesh, P()), var.get_value()))))
    return nnx.from_flat_state(shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split on their leading dimension over both data-parallel axes; the spec
    names only that axis, so it places arrays of any rank (rank-1 labels and rewards, (b, t)
    tokens, (b, t, ...) features)."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
