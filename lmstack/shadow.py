"""Shadow variables: frozen per-parameter companions kept inside the model.

Some runs keep, beside each trainable parameter, a value of the same shape that is never
differentiated: L2-SP and EWC's anchors ``theta_0`` and Fisher estimate
(:mod:`lmstack.forgetting.penalties`), the DPO family's reference policy
(:mod:`lmstack.objectives.preference`). They live in the model as variables that are not
``nnx.Param``, under ``model.<name>`` at the path of the parameter they belong to, so they
land in ``state["frozen"]``, are sharded like their parameter (same logical axis names) and
are checkpointed with the state; a resumed run has them exactly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def attach(model: nnx.Module, trainable: Any, name: str, kind: type[nnx.Variable]) -> None:
    """Add ``model.<name>``: a tree of zero ``kind`` variables, one at each trainable parameter's
    path (``trainable``: the nnx filter of the trainable set), with its shape, dtype and
    logical axis names, so it is sharded like the parameter."""
    root = nnx.Dict()
    for path, var in nnx.to_flat_state(nnx.state(model, trainable)):
        node = root
        for part in path[:-1]:
            if part not in node:
                node[part] = nnx.Dict()
            node = node[part]
        node[path[-1]] = kind(jnp.zeros(var.shape, var.dtype), out_sharding=var.get_metadata().get("out_sharding"))
    setattr(model, name, root)


def flat_values(state: nnx.State) -> dict[tuple, jax.Array]:
    """``{path: array}`` of every variable of ``state``."""
    return {path: var.get_value() for path, var in nnx.to_flat_state(state)}


def fill(state: dict, run: Any, name: str, values: nnx.State) -> dict:
    """``state`` (a train state) with the shadow variables under ``frozen[name]`` set to
    ``values`` (a state at the trainable parameters' paths), each placed in its sharding."""

    def put(frozen: nnx.State, values: nnx.State) -> nnx.State:
        new = flat_values(values)
        return nnx.from_flat_state([(p, v.replace(new[p[1:]].astype(v.dtype)) if p[0] == name else v)
                                    for p, v in nnx.to_flat_state(frozen)])

    with jax.set_mesh(run.mesh):
        frozen = jax.jit(put, out_shardings=run.shardings["frozen"])(state["frozen"], values)
    return {**state, "frozen": frozen}
