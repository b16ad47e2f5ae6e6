"""The compiled train and eval steps: module-level pure functions over split state.

``TrainState`` is a plain dict pytree: ``step``, ``params`` (the trainable nnx state),
``frozen`` (the model's other variables, never differentiated) and ``opt_state``. The
static pieces (graph definition, optimizer, objective) are bound with ``functools.partial``
by :func:`compile_train_step`, which jits once with explicit in/out shardings.

Gradients over a data-parallel mesh are summed by the compiler (GSPMD): it inserts one
all-reduce for all of them. XLA:CPU synchronises its devices once for every operand of that
all-reduce (39 rendezvous a step for the nanoGPT Shakespeare model, 3.4-5.6 ms of a device's
step in a trace); ``flat_allreduce`` instead sums the loss, aux and gradients on each device
under ``shard_map`` and all-reduces them as one flat buffer (one operand), as PyTorch's
DDP reduces gradient buckets; :meth:`lmstack.run.Run.train_step` uses it where
:func:`flat_allreduce_pays`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmstack.objectives.base import normalise
from lmstack.optim import schedule_count
from lmstack.sharding import constrain

TrainState = dict[str, Any]


def _split_microbatches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """(B, ...) -> (n, B/n, ...), taking every n-th row so that each data-parallel shard
    contributes equally to every microbatch (no resharding of the batch)."""

    def split(x):
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "batch"))

    return jax.tree.map(split, batch)


def _loss_and_grads(graphdef, params, frozen, objective, batch, rng, microbatches):
    """Summed loss, summed aux and summed gradients over the batch's microbatches."""

    # the frozen variables are rebuilt inside the differentiated function (the tree.map makes new
    # Variable objects at this trace level): nnx.scan over the blocks refuses variables from the
    # enclosing jit's level, which a block holding frozen parameters (a LoRA base) would pass it
    def loss_fn(p, fr, mb, r):
        return objective.loss_fn(nnx.merge(graphdef, p, jax.tree.map(lambda x: x, fr)), mb, r)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
        (loss_sum, aux), grads = grad_fn(params, frozen, batch, rng)
        return loss_sum, aux, grads

    def accumulate(carry, xs):
        mb, i = xs
        out = grad_fn(params, frozen, mb, None if rng is None else jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, out), None

    mbs = _split_microbatches(batch, microbatches)
    shapes = jax.eval_shape(grad_fn, params, frozen, jax.tree.map(lambda x: x[0], mbs), rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    ((loss_sum, aux), grads), _ = jax.lax.scan(accumulate, zeros, (mbs, jnp.arange(microbatches)))
    return loss_sum, aux, grads


def flat_allreduce_pays(mesh: Mesh, objective: Any) -> bool:
    """Whether ``flat_allreduce`` applies and pays: CPU devices, a mesh that is data parallel
    only (``data`` > 1, ``fsdp`` = ``tensor`` = 1) and an objective whose loss is a sum over
    rows (``exact_microbatches``). Elsewhere the compiler's all-reduce is kept: the
    per-operand synchronisation it saves was measured on XLA:CPU only, and sharded weights
    would be gathered to be flattened."""
    return (mesh.devices.flat[0].platform == "cpu" and mesh.shape["data"] > 1
            and mesh.shape["fsdp"] == mesh.shape["tensor"] == 1 and getattr(objective, "exact_microbatches", True))


def _summed_per_device(mesh: Mesh, sums_fn):
    """``sums_fn(params, frozen, batch, rng) -> pytree of sums`` run by each device of
    ``mesh``'s ``data`` axis on its block of the batch's rows (``shard_map``, the axis
    manual), the devices' sums then added by one ``psum`` of a single flat float buffer
    (``ravel_pytree``; integer sums go through it as floats, exact below 2**24). Exact for
    losses that are sums over rows (``exact_microbatches``); dropout masks stay those of the
    whole batch (:mod:`lmstack.models.dropout`)."""

    def local(params, frozen, batch, rng):
        flat, unravel = ravel_pytree(sums_fn(params, frozen, batch, rng))
        return unravel(jax.lax.psum(flat, "data"))

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data"), P()), out_specs=P(),
                         axis_names={"data"}, check_vma=False)


def _freeze_first_layers(updates: Any, k: int) -> Any:
    """``updates`` with the rows of the first ``k`` layers of every stacked parameter (logical
    axis ``layers`` first) zeroed, weight decay included: those layers stay exactly as they were."""

    def mask(v: Any) -> Any:
        names = v.get_metadata().get("out_sharding") or () if isinstance(v, nnx.Variable) else ()
        if not names or names[0] != "layers":
            return v
        keep = (jnp.arange(v.shape[0]) >= k).reshape(-1, *([1] * (v.ndim - 1)))
        return v.replace(v.get_value() * keep.astype(v.dtype))

    return jax.tree.map(mask, updates, is_leaf=lambda x: isinstance(x, nnx.Variable))


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    objective: Any,
    microbatches: int,
    frozen_layers: int = 0,
    penalty: Any = None,
    flat_allreduce: Mesh | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on one global batch; returns the new state and the metrics.

    Gradient accumulation: with ``microbatches`` n the batch is split into n row subsets,
    loss sums, ``aux`` sums and gradients are summed over them and divided by the total
    ``aux["weight"]`` once, so the update equals the full-batch one (objectives draw every
    randomness that shapes a batch per example in the data pipeline; an objective with
    ``exact_microbatches = False`` is refused when the config loads). ``rng`` only feeds
    the model's dropout: microbatch i gets ``fold_in(rng, i)``, so with dropout the masks
    (not the batch) differ between microbatch counts, equal in distribution only. ``rng``
    is ``fold_in(key, state["step"])`` (``key``: the run's seed key, replicated), drawn in
    the step so that the host dispatches nothing else and a resumed run draws what the
    uninterrupted one did.

    ``flat_allreduce`` (a mesh whose axes other than ``data`` have size 1, for objectives
    with ``exact_microbatches``): the per-device sums are all-reduced as one flat buffer
    (module docstring); the update is the same as without it.

    ``frozen_layers`` k > 0 zeroes the updates (weight decay included) of the first k
    layers of every stacked parameter, so they stay exactly as they were; the trainable set
    (``state["params"]``) is chosen per parameter path, this per layer of a stack.

    ``penalty(params, frozen) -> scalar`` (optional, e.g. L2-SP or EWC from
    ``lmstack.forgetting.penalties``) is added to the per-unit loss: the update minimises
    ``loss_sum / weight + penalty``. That is adding ``weight * penalty`` to the summed loss
    before the one division by the total weight; since the penalty does not depend on the
    batch, its value and gradient are computed once per step and added after that division,
    which is the same for every microbatch count. ``loss`` stays the objective's (comparable
    with evaluation); ``penalty`` is reported on its own.

    Non-finite guard: if the loss or the gradient norm is not finite, parameters and
    optimizer state stay as they were and ``skipped`` is 1. ``step`` still advances (it
    counts batches consumed), but the skipped update consumes no learning-rate schedule
    step: the schedule follows the optimizer's update count (``lmstack.optim``), so later
    updates apply the rates they would have without the bad batch. ``lr`` is the rate this
    update applied: ``schedule(count)`` before the update, 0 where it was skipped.
    """
    params = state["params"]
    rng = jax.random.fold_in(key, state["step"])

    def sums_fn(params, frozen, batch, rng):
        return _loss_and_grads(graphdef, params, frozen, objective, batch, rng, microbatches)

    if flat_allreduce is not None:
        sums_fn = _summed_per_device(flat_allreduce, sums_fn)
    loss_sum, aux, grads = sums_fn(params, state["frozen"], batch, rng)
    weight = jnp.maximum(aux["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    loss = loss_sum / weight
    extra = {}
    if penalty is not None:
        extra["penalty"], penalty_grads = jax.value_and_grad(penalty)(params, state["frozen"])
        grads = jax.tree.map(jnp.add, grads, penalty_grads)
    grad_norm = optax.tree.norm(grads)
    lr = schedule(schedule_count(state["opt_state"]))
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    if frozen_layers:
        updates = _freeze_first_layers(updates, frozen_layers)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = {
        "step": state["step"] + 1,
        "params": keep(new_params, params),
        "frozen": state["frozen"],
        "opt_state": keep(opt_state, state["opt_state"]),
    }
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": jnp.where(finite, lr, 0.0),
        "tokens": aux["weight"],
        "skipped": 1.0 - finite.astype(jnp.float32),
        **normalise(aux),
        **extra,
    }
    return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef, objective: Any):
    """Summed loss and aux of one batch, deterministic (no dropout)."""
    loss_sum, aux = objective.loss_fn(nnx.merge(graphdef, state["params"], state["frozen"]), batch, None)
    return {"loss": loss_sum, **aux}


def compile_train_step(graphdef, tx, schedule, objective, microbatches, state_sharding, batch_sharding: NamedSharding,
                       frozen_layers: int = 0, penalty: Any = None, flat_allreduce: bool = False):
    """``jax.jit`` of :func:`train_step` with its static parts bound; donates the state.
    ``flat_allreduce``: see :func:`train_step` (on ``batch_sharding``'s mesh)."""
    fn = functools.partial(
        train_step, graphdef=graphdef, tx=tx, schedule=schedule, objective=objective, microbatches=microbatches,
        frozen_layers=frozen_layers, penalty=penalty, flat_allreduce=batch_sharding.mesh if flat_allreduce else None,
    )
    replicated = NamedSharding(batch_sharding.mesh, P())
    return jax.jit(
        fn,
        in_shardings=(state_sharding, batch_sharding, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )


def compile_eval_step(graphdef, objective, state_sharding, batch_sharding: NamedSharding):
    fn = functools.partial(eval_step, graphdef=graphdef, objective=objective)
    replicated = NamedSharding(batch_sharding.mesh, P())
    return jax.jit(fn, in_shardings=(state_sharding, batch_sharding), out_shardings=replicated)
