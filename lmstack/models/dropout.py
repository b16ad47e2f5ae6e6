"""Inverted dropout whose masks are the same on every mesh.

A dropout mask is drawn for the whole batch from one key: jax's partitionable threefry
(``jax_threefry_partitionable``, on by default) gives each element the bits of its global
index, so a batch split over devices by the compiler draws what one device would. Inside a
``shard_map`` whose ``data`` axis is manual (the CPU train step's per-device gradient sums,
:mod:`lmstack.step`), each device sees only its block of rows; there the whole batch's mask
is drawn and the device keeps its own rows, so the update stays the one of any other mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def batch_bernoulli(key: Array, p: float, shape: tuple[int, ...]) -> Array:
    """``jax.random.bernoulli(key, p, shape)`` for an array whose leading axis is the batch:
    booleans of ``shape``, True with probability ``p``, equal to the rows of the whole
    batch's draw when called inside a manual ``data`` axis (rows in blocks by device, as
    ``shard_map`` splits ``P('data')``)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "data" not in mesh.manual_axes:
        return jax.random.bernoulli(key, p, shape)
    rows = shape[0]
    whole = jax.random.bernoulli(key, p, (rows * mesh.shape["data"], *shape[1:]))
    return jax.lax.dynamic_slice_in_dim(whole, jax.lax.axis_index("data") * rows, rows, axis=0)


def dropout(x: Array, rate: float, rng: Array | None) -> Array:
    """Inverted dropout of ``x`` (leading axis: batch) driven by an explicit key: each element
    kept with probability ``1 - rate`` and scaled by ``1 / (1 - rate)``, in ``x``'s dtype;
    identity when ``rate`` is 0 or ``rng`` is None (evaluation)."""
    if rate == 0.0 or rng is None:
        return x
    keep = batch_bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
