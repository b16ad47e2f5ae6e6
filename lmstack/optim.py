"""AdamW or Muon with warmup and decay, global-norm clipping and weight-decay masks, from config.

``optimizer.name`` picks the update direction:

- ``adamw`` (default): optax's AdamW (Loshchilov & Hutter 2019), as nanoGPT, MaxText and HF
  Trainer use it.
- ``muon``: Muon (Jordan et al. 2024, modded-nanogpt) on the hidden weight matrices (a
  weight with an ``embed`` axis and a ``heads``, ``kv_heads``, ``head_dim`` or ``mlp`` axis:
  the attention and MLP projections, and the encoder's d x d pooler and MLM transform),
  AdamW on everything else (embeddings, output and classifier heads, norms, biases, and
  every PEFT parameter: with a PEFT method Muon changes nothing). Muon's update is the Nesterov momentum
  (``muon_beta``) orthogonalised by ``muon_ns_steps`` Newton-Schulz iterations, one matrix
  per layer (the stacked ``layers`` axis is a batch axis); the projection's input axes are
  the matrix's rows, its output axes the columns. On a mesh with ``data`` > 1 each
  data-parallel device orthogonalises its share of the layers (where ``data`` divides their
  number) and XLA gathers the result, as modded-nanogpt splits the matrices over its ranks
  (quickstart step on 2 CPU devices, 12 alternating turns in one process: median 1142 ->
  1109 ms). It is scaled by
  ``0.2 * sqrt(max(fan_in, fan_out))`` (Liu et al. 2025, "Muon is Scalable for LLM
  Training") so its RMS matches AdamW's and ``lr`` and ``weight_decay`` mean the same for
  both parts. Both parts share the clipping, the decoupled weight decay ``lr * wd * w`` and
  the one learning-rate schedule.

The schedule is indexed by the optimizer's own update count (optax's
``ScaleByScheduleState.count`` in the optimizer state), not by the train step: a step whose
update is skipped (non-finite loss or gradients, see ``lmstack.step.train_step``) keeps the
old optimizer state, so it consumes no schedule step; :func:`schedule_count` reads the
count, and the learning rate an update applies is ``schedule(schedule_count(opt_state))``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers, scale_by_muon


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


MUON_HIDDEN_AXES = ("heads", "kv_heads", "head_dim", "mlp")
MUON_RMS = 0.2  # Liu et al. 2025: the RMS of an AdamW update


def muon_dimensions(v: nnx.Variable) -> MuonDimensionNumbers | None:
    """How Muon sees a parameter as matrices: ``MuonDimensionNumbers`` (reduction = the input
    axes, output = the output axes, any ``layers`` axis a batch axis) for a hidden projection
    weight, None for a parameter AdamW updates (see the module docstring). A projection's
    weight is ``(*in, *out)`` with ``embed`` first (a projection into the heads or the MLP)
    or last (back into the residual stream)."""
    names = v.get_metadata().get("out_sharding") or ()
    core = [i for i, n in enumerate(names) if n != "layers"]
    axes = [names[i] for i in core]
    if "embed" not in axes or not any(n in MUON_HIDDEN_AXES for n in axes):
        return None  # embeddings, norms, biases
    if any(n not in MUON_HIDDEN_AXES + ("embed",) for n in axes):
        return None  # an axis no hidden projection has
    if axes[0] == "embed":
        return MuonDimensionNumbers(reduction_axis=(core[0],), output_axis=tuple(core[1:]))
    if axes[-1] == "embed":
        return MuonDimensionNumbers(reduction_axis=tuple(core[:-1]), output_axis=(core[-1],))
    return None


def _muon_direction(opt: Any) -> optax.GradientTransformation:
    """Muon on the hidden matrices, Adam elsewhere: the update direction before weight decay
    and the learning rate (both applied by :func:`make_optimizer`)."""
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731

    def labels(params):
        return jax.tree.map(lambda v: v.replace("muon" if muon_dimensions(v) else "adam"), params, is_leaf=is_var)

    def dims(tree):  # the muon part's view: its leaves' dimension numbers, the rest masked out
        def one(v):
            return v if isinstance(v.get_value(), optax.MaskedNode) else v.replace(muon_dimensions(v))

        return jax.tree.map(one, tree, is_leaf=is_var)

    def adam_rms(updates, state, params=None):  # x 0.2 sqrt(max(fan_in, fan_out)), per matrix
        del params

        def scale(u, d):
            fan_in = math.prod(u.shape[a] for a in d.reduction_axis)
            fan_out = math.prod(u.shape[a] for a in d.output_axis)
            return u * (MUON_RMS * math.sqrt(max(fan_in, fan_out)))

        return jax.tree.map(scale, updates, dims(updates), is_leaf=lambda x: isinstance(x, MuonDimensionNumbers)), state

    def split_layers(updates, state, params=None):
        # each data-parallel device orthogonalises its share of a stacked weight's layers (as
        # modded-nanogpt's Muon splits the matrices over its ranks); XLA gathers the result
        del params
        mesh = jax.sharding.get_abstract_mesh()
        n = 0 if mesh.empty else dict(mesh.shape).get("data", 1)

        def one(v):
            u, names = v.get_value(), v.get_metadata().get("out_sharding") or ()
            if isinstance(u, optax.MaskedNode) or n < 2 or names[:1] != ("layers",) or u.shape[0] % n:
                return v
            return v.replace(jax.lax.with_sharding_constraint(u, P("data", *[P.UNCONSTRAINED] * (u.ndim - 1))))

        return jax.tree.map(one, updates, is_leaf=is_var), state

    muon = optax.chain(
        optax.GradientTransformation(optax.init_empty_state, split_layers),
        scale_by_muon(ns_steps=opt.muon_ns_steps, beta=opt.muon_beta, nesterov=True, weight_dimension_numbers=dims),
        optax.GradientTransformation(optax.init_empty_state, adam_rms),
    )
    adam = optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps)
    return optax.partition({"muon": muon, "adam": adam}, labels)


def make_optimizer(opt: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain and its schedule; ``schedule(schedule_count(opt_state))`` is the
    learning rate of the next update (the train step logs it). Raises ValueError for an
    unknown ``optimizer.name``."""
    schedule = learning_rate_schedule(opt, total_steps)
    clip = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm > 0 else []
    if opt.name == "muon":
        decay = optax.add_decayed_weights(opt.weight_decay, lambda p: weight_decay_mask(p, opt.decay_embeddings))
        return optax.chain(*clip, _muon_direction(opt), decay, optax.scale_by_learning_rate(schedule)), schedule
    if opt.name != "adamw":
        raise ValueError(f"optimizer.name={opt.name!r}: must be adamw or muon")
    adamw = optax.adamw(
        schedule,
        b1=opt.b1,
        b2=opt.b2,
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        mask=lambda p: weight_decay_mask(p, opt.decay_embeddings),
    )
    return optax.chain(*clip, adamw), schedule
