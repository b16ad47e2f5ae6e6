"""Build the model named by the config and create its train state directly sharded.

Parameters are initialised inside ``jax.jit`` with ``out_shardings`` taken from their
logical names, so no device ever holds the full unsharded model.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from lmstack import registry
from lmstack.models.projection import QuantizedWeight
from lmstack.peft.nf4 import NF4Tensor
from lmstack.sharding import replicated, state_shardings
from lmstack.step import TrainState


def build_model_factory(model_section: Any, *, vocab_size: int, max_seq_len: int, seed: int,
                        peft_section: Any = None) -> tuple[Callable[[], nnx.Module], Any]:
    """A zero-argument constructor of the model a (composed) ``config.model`` section or a run
    spec's model describes, with the adapters of ``peft_section`` (a composed
    ``config.peft``) attached, and its resolved model config."""
    model_cls = registry.lookup("model", model_section.name, "model.name")
    mcfg = model_cls.config_class.from_config(model_section, vocab_size=vocab_size, max_seq_len=max_seq_len)
    method = peft_method(peft_section)

    def make() -> nnx.Module:
        model = model_cls(mcfg, rngs=nnx.Rngs(params=seed))
        method.apply(model, peft_section, jax.random.fold_in(jax.random.key(seed), 1 << 20))
        return model

    return make, mcfg


def peft_method(peft_section: Any) -> Any:
    """The registered PEFT method a ``config.peft`` section names (``peft.none`` for None)."""
    return registry.lookup("peft", "none" if peft_section is None else peft_section.name, "peft.name")


def model_factory(cfg: Any, vocab_size: int) -> tuple[Callable[[], nnx.Module], Any]:
    """:func:`build_model_factory` for a whole config (its plug-in sections composed first)."""
    from lmstack.config import compose

    cfg = compose(cfg)
    return build_model_factory(cfg.model, vocab_size=vocab_size, max_seq_len=cfg.data.seq_len, seed=cfg.train.seed,
                               peft_section=cfg.peft)


def _split(model: nnx.Module, trainable: Any) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """The trainable set, and everything else (frozen)."""
    return nnx.split(model, trainable, ...)


def abstract_state(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh,
                   trainable: Any = nnx.Param):
    """(graphdef, shape-and-sharding tree of the train state, sharding tree). ``trainable`` is
    the nnx filter of the parameters that get gradients and optimizer state
    (:func:`lmstack.peft.base.trainable_filter`); the rest goes to ``frozen``."""
    graphdef, params, frozen = _split(nnx.eval_shape(make_model), trainable)
    param_sh, frozen_sh = state_shardings(params, mesh), state_shardings(frozen, mesh)
    opt_shapes = jax.eval_shape(tx.init, params)
    opt_sh = _opt_state_shardings(tx, opt_shapes, param_sh, mesh)
    shardings = {"step": replicated(mesh), "params": param_sh, "frozen": frozen_sh, "opt_state": opt_sh}
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "frozen": frozen, "opt_state": opt_shapes}
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return graphdef, abstract, shardings


def _opt_state_shardings(tx: optax.GradientTransformation, opt_shapes: Any, param_sh: Any, mesh: Mesh) -> Any:
    """Optimizer moments are sharded like the parameters they track; scalars are replicated.
    A partitioned optimizer (Muon + Adam) leaves ``MaskedNode`` where a part tracks nothing."""
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return optax.tree_utils.tree_map_params(
        tx, lambda x, sh: x if masked(x) else sh, opt_shapes, param_sh,
        transform_non_params=lambda _: replicated(mesh), is_leaf=masked,
    )


def init_state(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh,
               trainable: Any = nnx.Param):
    """A freshly initialised, sharded train state: (graphdef, state, shardings)."""
    graphdef, _, shardings = abstract_state(make_model, tx, mesh, trainable)

    def create() -> TrainState:
        _, params, frozen = _split(make_model(), trainable)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": frozen, "opt_state": tx.init(params)}

    with jax.set_mesh(mesh):
        state = jax.jit(create, out_shardings=shardings)()
    return graphdef, state, shardings


def param_count(state_or_abstract: TrainState) -> int:
    """Every ``nnx.Param`` of the model, trainable or frozen, and every base weight QLoRA
    stores as NF4 (``QuantizedWeight``) at its weight's element count, not its storage's."""
    frozen = state_or_abstract["frozen"]
    n = sum(x.size for x in jax.tree.leaves(frozen.filter(nnx.Param)))
    stored = jax.tree.leaves(frozen.filter(QuantizedWeight), is_leaf=lambda x: isinstance(x, NF4Tensor))
    n += sum(math.prod(t.data.shape[:-1]) * math.prod(t.shape) for t in stored)  # stack dims x one weight
    return trainable_count(state_or_abstract) + n


def trainable_count(state_or_abstract: TrainState) -> int:
    """The parameters that get gradients and optimizer state."""
    return sum(x.size for x in jax.tree.leaves(state_or_abstract["params"]))
