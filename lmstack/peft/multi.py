"""Several LoRA adapters on one base: switch, combine, and serve a batch whose rows use
different adapters.

An adapter is the ``nnx.LoRAParam`` state of a model (:func:`adapter_of`), so N adapters
share one copy of the base weights. :func:`mixed_logits` runs each row with its own adapter:
the adapters are stacked, each row gathers its own factors and the forward pass is
``jax.vmap``-ed over rows with the base weights shared (not batched), so a row's result is
exactly that of running it alone with its adapter (as S-LoRA / Punica serve many adapters;
here without custom kernels). :func:`combine_adapters` is PEFT's ``add_weighted_adapter``
with ``combination_type='cat'``: the ranks are concatenated, so the combined update is
exactly ``sum_i w_i * scaling * A_i B_i``.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lmstack.config import ConfigError


def adapter_of(model: nnx.Module) -> nnx.State:
    """The model's current adapter (every ``nnx.LoRAParam``)."""
    state = nnx.state(model, nnx.LoRAParam)
    if not jax.tree.leaves(state):
        raise ConfigError("the model holds no LoRA adapter: build it with --config.peft.name=lora")
    return state


def set_adapter(model: nnx.Module, adapter: nnx.State) -> None:
    """Switch ``model`` to ``adapter`` (same targets and rank), in place."""
    nnx.update(model, adapter)


def combine_adapters(adapters: Sequence[nnx.State], weights: Sequence[float]) -> nnx.State:
    """One adapter whose update is ``sum_i weights[i] * scaling * A_i B_i``: ``A`` and ``B``
    concatenated along the rank axis (rank ``sum r_i``), the weights folded into ``A``
    (PEFT ``add_weighted_adapter(combination_type='cat')``). Load it into a model built with
    rank ``sum r_i`` and ``alpha`` chosen so its scaling equals the parts' (e.g. parts r=4,
    alpha=8 -> combined r=8, alpha=16)."""
    if len(adapters) != len(weights) or not adapters:
        raise ConfigError(f"combine_adapters: {len(adapters)} adapters but {len(weights)} weights")

    def cat(path: tuple, *vs: Any) -> Any:
        name = path[-1]
        axis = -1 if name == "lora_a" else _rank_axis_b(vs[0])
        parts = [v * w if name == "lora_a" else v for v, w in zip(vs, weights)]
        return jnp.concatenate(parts, axis=axis)

    flat = [dict(nnx.to_flat_state(a)) for a in adapters]
    out = []
    for path in flat[0]:
        values = [f[path].get_value() for f in flat]
        out.append((path, flat[0][path].replace(cat(path, *values))))
    return nnx.from_flat_state(out)


def _rank_axis_b(b: jax.Array) -> int:
    """``lora_b`` is ``(*layers, r, *out)``: stacked block adapters have one leading axis."""
    return 1 if b.ndim >= 3 else 0


def stack_adapters(adapters: Sequence[nnx.State]) -> nnx.State:
    """N adapters (same targets and rank) stacked on a new leading axis, for :func:`mixed_logits`."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *adapters)


def mixed_logits(model: nnx.Module, adapters: nnx.State, adapter_ids: jax.Array, tokens_bt: jax.Array,
                 **kwargs: Any) -> jax.Array:
    """Logits ``(b, t, vocab)`` of ``model`` where row i uses adapter ``adapter_ids[i]`` of the
    stacked ``adapters`` (:func:`stack_adapters`); ``kwargs`` go to the model per row
    (``segment_ids``, ``positions`` given as ``(b, t)`` arrays are split by row)."""
    graphdef, _, rest = nnx.split(model, nnx.LoRAParam, ...)
    per_row = jax.tree.map(lambda x: x[adapter_ids], adapters)
    row_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array) and v.shape[:1] == tokens_bt.shape[:1]}
    fixed = {k: v for k, v in kwargs.items() if k not in row_kwargs}

    def one(lora: nnx.State, tokens_t: jax.Array, row: dict[str, jax.Array]) -> jax.Array:
        # the shared variables are rebuilt at this trace level (nnx.scan refuses outer ones)
        m = nnx.merge(graphdef, lora, jax.tree.map(lambda x: x, rest))
        return m(tokens_t[None], **{k: v[None] for k, v in row.items()}, **fixed)[0]

    return jax.vmap(one)(per_row, tokens_bt, row_kwargs)
