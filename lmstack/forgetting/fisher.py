"""The diagonal empirical Fisher information of EWC (Kirkpatrick et al. 2017).

The estimator is the textbook per-example one: for each of ``N`` examples (windows of
the parent's training split), the gradient ``g_n`` of that example's loss (its summed
loss over its weight, e.g. the mean token negative log-likelihood of the window) with
respect to the trainable parameters, and ``F = (1 / N) sum_n g_n ** 2`` elementwise. The
gradients are taken per example (``jax.vmap`` of ``jax.grad``), never of a batch mean: the
square of a batch's mean gradient would be a different (smaller, batch-size dependent)
quantity; the batch size only bounds how many per-example gradients are held at once.
"Empirical": the labels are the data's next tokens, not samples from the model.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
from flax import nnx


def _example_loss(params: nnx.State, frozen: nnx.State, example: dict, *, graphdef: nnx.GraphDef,
                  objective: Any) -> jax.Array:
    batch = jax.tree.map(lambda x: x[None], example)
    # new frozen Variable objects at this trace level (see lmstack.step._loss_and_grads)
    model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, frozen))
    loss_sum, aux = objective.loss_fn(model, batch, None)
    return loss_sum / jnp.maximum(aux["weight"], 1.0)


def _squared_gradient_sum(params: nnx.State, frozen: nnx.State, batch: dict, *, graphdef: nnx.GraphDef,
                          objective: Any) -> nnx.State:
    loss = functools.partial(_example_loss, graphdef=graphdef, objective=objective)
    grads = jax.vmap(jax.grad(loss), in_axes=(None, None, 0))(params, frozen, batch)
    return jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0), grads)


def fisher_diagonal(graphdef: nnx.GraphDef, objective: Any, params: nnx.State, frozen: nnx.State,
                    batches: Iterable[dict], param_shardings: Any = None) -> nnx.State:
    """float32 ``F`` shaped like ``params``: the mean over every example (row) of ``batches`` of
    the squared gradient of that example's loss ``objective.loss_fn`` (summed loss / weight,
    no dropout) at ``params`` (module docstring). ``param_shardings`` places the result."""
    fn = jax.jit(functools.partial(_squared_gradient_sum, graphdef=graphdef, objective=objective),
                 out_shardings=param_shardings)
    total, n = None, 0
    for batch in batches:
        part = fn(params, frozen, batch)
        total = part if total is None else jax.tree.map(jnp.add, total, part)
        n += len(next(iter(batch.values())))
    if total is None:
        raise ValueError("fisher_diagonal: no batches")
    return jax.tree.map(lambda x: x / n, total)


def parent_fisher(run: Any, state: dict) -> nnx.State:
    """:func:`fisher_diagonal` of ``run``'s objective at ``state``'s trainable parameters over
    ``regularization.fisher_batches`` batches of ``regularization.fisher_batch_size`` random
    windows of the parent's training split (:mod:`lmstack.forgetting.parent`), drawn with
    ``data.seed``. MeshError when the batch size does not split over the data-parallel devices."""
    from lmstack.data.pipeline import train_iterator
    from lmstack.distributed import global_batch
    from lmstack.forgetting.parent import parent_streams
    from lmstack.run import check_batch

    cfg, section = run.cfg, run.cfg.regularization
    check_batch(section.fisher_batch_size, run.mesh, "regularization.fisher_batch_size")
    train, _ = parent_streams(cfg, run.spec.tokenizer)
    windows = train_iterator(train, seq_len=cfg.data.seq_len, batch_size=section.fisher_batch_size, seed=cfg.data.seed)
    batches = (global_batch(next(windows), run.batch_sharding) for _ in range(section.fisher_batches))
    with jax.set_mesh(run.mesh):
        return fisher_diagonal(run.graphdef, run.objective, state["params"], state["frozen"], batches,
                               run.shardings["params"])
