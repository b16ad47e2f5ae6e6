"""Penalties that pull the weights back towards where they started: the ``regularization.NAME``
plug-ins (``none``, ``l2sp``, ``ewc``).

- ``l2sp`` (Li, Grandvalet and Davoine 2018, "Explicit inductive bias for transfer learning
  with convolutional networks"): ``alpha / 2 * ||theta - theta_0||^2`` over the trainable
  parameters, ``theta_0`` the weights the run started from (``init.from``'s, or the
  initialisation from scratch). The paper's second term, ``beta / 2 * ||w||^2`` on new
  layers, has no counterpart here: a continued run adds no layers (weight decay is the
  optimizer's).
- ``ewc`` (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural
  networks"): ``ewc_lambda / 2 * sum_i F_i (theta_i - theta_0,i)^2`` with ``F`` the diagonal
  empirical Fisher of the parent's objective on the parent's data
  (:func:`lmstack.forgetting.fisher.fisher_diagonal`), computed once when the run starts.

``theta_0`` and ``F`` are shadow variables (:mod:`lmstack.shadow`): :class:`Anchor` under
``model.anchor`` and :class:`Fisher` under ``model.fisher``, each at the path of the
parameter it belongs to, frozen, sharded like it and checkpointed with the state. A plug-in provides ``attach(model, trainable)`` (adds
the variables to a freshly built model), ``start(run, state) -> state`` (fills them once,
when a run starts) and ``penalty(section)`` (the ``penalty(params, frozen) -> scalar`` the
train step adds to the loss, or None).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lmstack import shadow
from lmstack.forgetting.parent import needs_parent_data, windows_only
from lmstack.registry import register
from lmstack.shadow import flat_values

Penalty = Callable[[nnx.State, nnx.State], jax.Array]


class Anchor(nnx.Variable):
    """A trainable parameter's starting value ``theta_0`` (frozen state)."""


class Fisher(nnx.Variable):
    """A trainable parameter's diagonal Fisher information estimate (frozen state)."""


def l2sp_penalty(params: nnx.State, frozen: nnx.State, *, alpha: float) -> jax.Array:
    """``alpha / 2 * sum ||theta - theta_0||^2`` (float32 scalar) over the leaves of ``params``
    (the trainable set), ``theta_0`` the :class:`Anchor` at the same path under ``frozen["anchor"]``."""
    anchors = flat_values(frozen["anchor"])
    total = sum(jnp.sum(jnp.square(p.astype(jnp.float32) - anchors[path].astype(jnp.float32)))
                for path, p in flat_values(params).items())
    return 0.5 * alpha * total


def ewc_penalty(params: nnx.State, frozen: nnx.State, *, ewc_lambda: float) -> jax.Array:
    """``ewc_lambda / 2 * sum F (theta - theta_0)^2`` (float32 scalar) over the leaves of
    ``params``, ``theta_0`` and ``F`` the :class:`Anchor` and :class:`Fisher` at the same path
    under ``frozen["anchor"]`` and ``frozen["fisher"]``."""
    anchors, fisher = flat_values(frozen["anchor"]), flat_values(frozen["fisher"])
    total = sum(jnp.sum(fisher[path] * jnp.square(p.astype(jnp.float32) - anchors[path].astype(jnp.float32)))
                for path, p in flat_values(params).items())
    return 0.5 * ewc_lambda * total


@register("regularization.none")
class NoRegularization:
    """No penalty: the run's loss is its objective's."""

    config_defaults: dict[str, Any] = {}

    @staticmethod
    def attach(model: nnx.Module, trainable: Any) -> None:
        del model, trainable

    @staticmethod
    def start(run: Any, state: dict) -> dict:
        return state

    @staticmethod
    def penalty(section: Any) -> Penalty | None:
        return None


@register("regularization.l2sp")
class L2SP:
    """L2-SP: ``alpha / 2 * ||theta - theta_0||^2`` towards the starting weights (module docstring)."""

    config_defaults: dict[str, Any] = {"alpha": 0.01}

    @staticmethod
    def attach(model: nnx.Module, trainable: Any) -> None:
        shadow.attach(model, trainable, "anchor", Anchor)

    @staticmethod
    def start(run: Any, state: dict) -> dict:
        """The anchors set to the trainable parameters of ``state`` (the run's starting weights)."""
        return shadow.fill(state, run, "anchor", state["params"])

    @staticmethod
    def penalty(section: Any) -> Penalty:
        return functools.partial(l2sp_penalty, alpha=float(section.alpha))


def _ewc_problems(cfg: Any) -> list[str]:
    s = cfg.regularization
    out = [f"regularization.{k}={s[k]!r} must be a positive int" for k in ("fisher_batches", "fisher_batch_size")
           if not isinstance(s[k], int) or isinstance(s[k], bool) or s[k] <= 0]
    who = "regularization.name=ewc (its Fisher is estimated on the parent's data)"
    return out + needs_parent_data(cfg, who) + windows_only(cfg, "regularization.name=ewc")


@register("regularization.ewc")
class EWC:
    """EWC: ``ewc_lambda / 2 * sum F (theta - theta_0)^2`` with the diagonal empirical Fisher of
    ``fisher_batches`` batches of ``fisher_batch_size`` windows of the parent's training split
    (module docstring; the estimator is per example, so ``fisher_batch_size`` changes only
    how many per-example gradients are held at once)."""

    config_defaults: dict[str, Any] = {"ewc_lambda": 1000.0, "fisher_batches": 16, "fisher_batch_size": 8}
    config_problems = staticmethod(_ewc_problems)

    @staticmethod
    def attach(model: nnx.Module, trainable: Any) -> None:
        shadow.attach(model, trainable, "anchor", Anchor)
        shadow.attach(model, trainable, "fisher", Fisher)

    @staticmethod
    def start(run: Any, state: dict) -> dict:
        """The anchors set to the starting weights and the Fisher estimated on the parent's data."""
        from lmstack.forgetting.fisher import parent_fisher

        state = shadow.fill(state, run, "anchor", state["params"])
        return shadow.fill(state, run, "fisher", parent_fisher(run, state))

    @staticmethod
    def penalty(section: Any) -> Penalty:
        return functools.partial(ewc_penalty, ewc_lambda=float(section.ewc_lambda))
