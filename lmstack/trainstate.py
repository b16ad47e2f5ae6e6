"""Build the model named by the config and create its train state directly sharded.

Parameters are initialised inside ``jax.jit`` with ``out_shardings`` taken from their
logical names, so no device ever holds the full unsharded model.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from lmstack import registry
from lmstack.sharding import replicated, state_shardings
from lmstack.step import TrainState


def build_model_factory(model_section: Any, *, vocab_size: int, max_seq_len: int,
                        seed: int) -> tuple[Callable[[], nnx.Module], Any]:
    """A zero-argument constructor of the model a (composed) ``config.model`` section or a run
    spec's model describes, and its resolved model config."""
    model_cls = registry.lookup("model", model_section.name, "model.name")
    mcfg = model_cls.config_class.from_config(model_section, vocab_size=vocab_size, max_seq_len=max_seq_len)
    return (lambda: model_cls(mcfg, rngs=nnx.Rngs(params=seed))), mcfg


def model_factory(cfg: Any, vocab_size: int) -> tuple[Callable[[], nnx.Module], Any]:
    """:func:`build_model_factory` for a whole config (its plug-in sections composed first)."""
    from lmstack.config import compose

    cfg = compose(cfg)
    return build_model_factory(cfg.model, vocab_size=vocab_size, max_seq_len=cfg.data.seq_len, seed=cfg.train.seed)


def _split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Trainable parameters, and everything else (frozen)."""
    return nnx.split(model, nnx.Param, ...)


def abstract_state(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh):
    """(graphdef, shape-and-sharding tree of the train state, sharding tree)."""
    graphdef, params, frozen = _split(nnx.eval_shape(make_model))
    param_sh, frozen_sh = state_shardings(params, mesh), state_shardings(frozen, mesh)
    opt_shapes = jax.eval_shape(tx.init, params)
    opt_sh = _opt_state_shardings(tx, opt_shapes, param_sh, mesh)
    shardings = {"step": replicated(mesh), "params": param_sh, "frozen": frozen_sh, "opt_state": opt_sh}
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "frozen": frozen, "opt_state": opt_shapes}
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return graphdef, abstract, shardings


def _opt_state_shardings(tx: optax.GradientTransformation, opt_shapes: Any, param_sh: Any, mesh: Mesh) -> Any:
    """Optimizer moments are sharded like the parameters they track; scalars are replicated."""
    return optax.tree_utils.tree_map_params(
        tx, lambda _, sh: sh, opt_shapes, param_sh, transform_non_params=lambda _: replicated(mesh)
    )


def init_state(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh):
    """A freshly initialised, sharded train state: (graphdef, state, shardings)."""
    graphdef, _, shardings = abstract_state(make_model, tx, mesh)

    def create() -> TrainState:
        _, params, frozen = _split(make_model())
        return {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": frozen, "opt_state": tx.init(params)}

    with jax.set_mesh(mesh):
        state = jax.jit(create, out_shardings=shardings)()
    return graphdef, state, shardings


def param_count(state_or_abstract: TrainState) -> int:
    return sum(x.size for x in jax.tree.leaves(state_or_abstract["params"]))
