"""AdamW with warmup and decay, global-norm clipping and weight-decay masks, from config.

The schedule is indexed by the optimizer's own update count (optax's
``ScaleByScheduleState.count`` in the optimizer state), not by the train step: a step whose
update is skipped (non-finite loss or gradients, see ``lmstack.step.train_step``) keeps the
old optimizer state, so it consumes no schedule step; :func:`schedule_count` reads the
count, and the learning rate an update applies is ``schedule(schedule_count(opt_state))``.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx


def learning_rate_schedule(opt: Any, total_steps: int) -> optax.Schedule:
    """Update count -> learning rate: linear warmup ``lr * (count + 1) / (warmup + 1)`` for
    the first ``warmup_steps`` updates (nanoGPT's formula: the first update already moves the
    weights, and the peak ``lr`` comes right after warmup), then cosine / linear decay from
    ``lr`` to ``lr * min_lr_ratio`` at ``decay_steps`` (default: the last step), or a
    constant rate."""
    decay_steps = opt.decay_steps or total_steps
    warmup = min(opt.warmup_steps, decay_steps)
    end = opt.lr * opt.min_lr_ratio
    warm = (lambda count: opt.lr * (count + 1) / (warmup + 1)) if warmup else None
    rest = max(decay_steps - warmup, 1)
    if opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(opt.lr, rest, alpha=opt.min_lr_ratio)
    elif opt.schedule == "linear":
        decay = optax.linear_schedule(opt.lr, end, rest)
    else:
        decay = optax.constant_schedule(opt.lr)
    return optax.join_schedules([warm, decay], [warmup]) if warm else decay


def schedule_count(opt_state: Any) -> jax.Array:
    """The number of updates the learning-rate schedule has counted: the ``count`` of the
    (single) ``optax.ScaleByScheduleState`` in an optimizer state from :func:`make_optimizer`.
    Raises ValueError if the state holds none or several."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(x)]
    if len(found) != 1:
        raise ValueError(f"the optimizer state holds {len(found)} schedule counts (ScaleByScheduleState), "
                         "not one: build the optimizer with lmstack.optim.make_optimizer")
    return found[0].count


def _logical_names(v: nnx.Variable) -> tuple[str, ...]:
    names = v.get_metadata().get("out_sharding") or ()
    return tuple(n for n in names if n != "layers")


def decays(v: nnx.Variable, decay_embeddings: bool) -> bool:
    """Weight decay applies to weight matrices only (an ``embed`` axis and at least one
    other): never to norms or biases (a per-head bias is 2-D but has no ``embed`` axis),
    and to lookup tables (first axis ``vocab``, ``positions`` or ``token_types``) only if asked."""
    names = _logical_names(v)
    if len(names) < 2 or "embed" not in names:
        return False
    if names[0] in ("vocab", "positions", "token_types"):
        return decay_embeddings
    return True


def weight_decay_mask(params: nnx.State, decay_embeddings: bool) -> nnx.State:
    """A tree of booleans shaped like ``params``."""
    return jax.tree.map(
        lambda v: v.replace(decays(v, decay_embeddings)), params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def make_optimizer(opt: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain and its schedule; ``schedule(schedule_count(opt_state))`` is the
    learning rate of the next update (the train step logs it)."""
    schedule = learning_rate_schedule(opt, total_steps)
    adamw = optax.adamw(
        schedule,
        b1=opt.b1,
        b2=opt.b2,
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        mask=lambda p: weight_decay_mask(p, opt.decay_embeddings),
    )
    clip = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm > 0 else []
    return optax.chain(*clip, adamw), schedule
