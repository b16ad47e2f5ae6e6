"""The reference policy of preference and RL objectives (the DPO family, GRPO's KL term).

Two ways, chosen by the run, never by the user (TRL's ``DPOTrainer`` does the same):

- a PEFT run (``peft.name`` set): the policy with its adapters taken out
  (:func:`lmstack.peft.base.disable_adapters`): the ``init.from`` base, no second copy in
  memory;
- otherwise a frozen copy of the starting weights, kept as shadow variables
  (:class:`Reference` under ``model.reference``, :mod:`lmstack.shadow`): filled from the
  state the run starts from (``init.from``'s weights), checkpointed with the state, so a
  resumed run compares against the same reference.

:class:`ReferencePolicy` is what an objective holds: ``attach`` / ``start`` give the run its
shadow variables, and :meth:`ReferencePolicy.model` gives, inside the loss function, the
reference model whose outputs the loss treats as constants.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from lmstack import registry, shadow
from lmstack.peft.base import disable_adapters


class Reference(nnx.Variable):
    """A trainable parameter's value in the reference policy (frozen state)."""


class ReferencePolicy:
    """The reference of a run configured by ``cfg`` (see the module docstring)."""

    def __init__(self, cfg: Any):
        self.adapter_types = registry.lookup("peft", cfg.peft.name, "peft.name").adapter_types

    @property
    def keeps_copy(self) -> bool:
        """Whether the reference is a frozen copy in the model (full fine-tuning)."""
        return not self.adapter_types

    def attach(self, model: nnx.Module, trainable: Any) -> None:
        if self.keeps_copy:
            shadow.attach(model, trainable, "reference", Reference)

    def start(self, run: Any, state: dict) -> dict:
        """The copy set to the trainable parameters the run starts from."""
        return shadow.fill(state, run, "reference", state["params"]) if self.keeps_copy else state

    def model(self, model: nnx.Module) -> nnx.Module:
        """A new model computing the reference policy: ``model``'s graph with the reference's
        weights (every value under ``stop_gradient``), for use inside a traced loss function."""
        graphdef, state = nnx.split(model)
        state = jax.tree.map(jax.lax.stop_gradient, state)
        if not self.keeps_copy:
            return disable_adapters(nnx.merge(graphdef, state), self.adapter_types)
        flat = nnx.to_flat_state(state)
        copy = {p[1:]: v.get_value() for p, v in flat if p[0] == "reference"}
        return nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(copy[p]) if p in copy else v) for p, v in flat]))
