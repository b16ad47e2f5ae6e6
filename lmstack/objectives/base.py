"""The objective contract: the only place that knows what a batch means and what the loss is.

An objective is a class registered as ``objective.NAME``, built from the whole config. The
trainer, evaluators and benchmarks use only this interface:

- ``train_batches(data) -> iterator`` and ``eval_batches(data) -> list``: the objective
  decides what a batch holds. The returned iterator must be a checkpointable grain
  iterator. :class:`WindowObjective` gives the default for pre-training objectives: random
  windows over the token stream (see ``lmstack.data.pipeline``); objectives with
  structured examples (span corruption, SFT, preference pairs) build theirs from the same
  pipeline pieces (``packed_examples_iterator``).
- ``loss_fn(model, batch, rng) -> (loss_sum, aux)``: runs inside the compiled step.
  ``loss_sum`` is summed over the batch and ``aux["weight"]`` is what it is a sum over
  (tokens, examples, pairs). Every other entry of ``aux`` is a sum too. The trainer divides
  by the total weight after summing over microbatches, so gradient accumulation gives
  exactly the full-batch update; evaluators sum over batches the same way. ``rng`` feeds
  the model's dropout only (None at evaluation): randomness that shapes a batch (noise,
  masks, prefix lengths) is drawn per example in the data pipeline, seeded per window,
  never from ``rng``, so it is the same whichever microbatch an example lands in.
- ``exact_microbatches`` (class attribute, default True): False where the loss couples the
  examples of a batch (in-batch negatives), so a split batch trains on something else;
  the loader refuses ``train.microbatches > 1`` for such objectives.
- ``config_defaults`` (class attribute): the objective's own keys of ``config.objective``
  with their defaults, and ``config_choices``: the allowed values of its string keys. The
  loader composes the section from them, so a key the objective lacks is an error.
- ``trainable_types`` (class attribute, optional): ``nnx.Param`` subclasses of parameters
  the objective adds to the model (in ``attach``) that are always trained, whatever
  ``train.trainable`` or the PEFT method select (PPO's value head;
  :func:`lmstack.peft.base.trainable_filter`).
- ``check_spec(spec)`` (optional): called by :meth:`lmstack.run.Run.for_training` with the
  run's spec before anything is written, for an objective that reads another run (the
  rollout objectives' ``objective.reward_model`` must share the policy's tokenizer); raises
  ConfigError.
- ``special_tokens(cfg)`` (classmethod): the names of the ids the objective reserves beyond
  the tokenizer's vocabulary (T5 sentinels ``<extra_id_N>``, ``[MASK]``, UL2 mode tokens).
  The run spec assigns them once (:mod:`lmstack.runspec`) and the objective is built with
  ``special_ids`` (name -> id), so a run started from another keeps its parent's ids.

Frozen copies of the policy's own weights (a DPO reference policy) are part of the model the
objective is given: a wrapper model whose frozen parts hold variables that are not
``nnx.Param``. The trainer differentiates and updates ``nnx.Param`` only; every other
variable is carried in ``state["frozen"]``, sharded by its logical names and checkpointed,
never differentiated. A separate model read from another run that the objective only
evaluates (the rollout objectives' reward model, :mod:`lmstack.rl.reward_model`) is held by
the objective, outside the train state, placed on the run's mesh.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Protocol

import numpy as np

import jax

from lmstack.data.pipeline import (
    eval_batches,
    train_iterator,
    transformed_eval_batches,
    transformed_windows_iterator,
)
from lmstack.data.replay import replay_iterator

Aux = dict[str, jax.Array]


class Objective(Protocol):
    config_defaults: dict[str, Any]
    config_choices: dict[str, tuple]
    exact_microbatches: bool

    def __init__(self, cfg: Any, special_ids: Mapping[str, int]) -> None: ...

    @classmethod
    def special_tokens(cls, cfg: Any) -> tuple[str, ...]: ...

    def train_batches(self, data: Any) -> Iterator[dict]: ...

    def eval_batches(self, data: Any) -> list[dict]: ...

    def loss_fn(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array | None) -> tuple[jax.Array, Aux]: ...


def microbatch_problems(objective: type, name: str, microbatches: int) -> list[str]:
    """The load-time error (one line, in a list) when ``train.microbatches`` would split the
    batch of an objective whose loss compares the examples of a batch (``exact_microbatches``
    False); an empty list otherwise."""
    if microbatches != 1 and not getattr(objective, "exact_microbatches", True):
        return [f"train.microbatches={microbatches}: objective.name={name} compares the examples of a batch with "
                f"each other (in-batch negatives), so a split batch trains on a different loss: "
                f"set --config.train.microbatches=1"]
    return []


class WindowObjective:
    """Batches of ``seq_len + 1``-token windows (``tokens``, ``segment_ids``, ``positions``)
    over the run's token stream: random windows for training, consecutive ones for eval."""

    config_defaults: dict[str, Any] = {}
    config_choices: dict[str, tuple] = {}
    exact_microbatches = True

    def __init__(self, cfg: Any, special_ids: Mapping[str, int] | None = None):
        self.cfg = cfg
        self.special_ids = dict(special_ids or {})

    @classmethod
    def special_tokens(cls, cfg: Any) -> tuple[str, ...]:
        return ()

    def train_batches(self, data: Any) -> Iterator[dict]:
        c = self.cfg
        if getattr(data, "replay", None) is not None:  # continued pre-training with replay.fraction > 0
            return replay_iterator(data.train, data.replay, fraction=c.replay.fraction, seq_len=c.data.seq_len,
                                   batch_size=c.train.batch_size, seed=c.data.seed, rows=data.train_rows)
        return train_iterator(data.train, seq_len=c.data.seq_len, batch_size=c.train.batch_size, seed=c.data.seed,
                              rows=data.train_rows)

    def eval_batches(self, data: Any) -> list[dict]:
        c = self.cfg
        if not len(data.val):
            return []
        return eval_batches(data.val, seq_len=c.data.seq_len, batch_size=c.eval.batch_size or c.train.batch_size,
                            max_batches=c.eval.batches)


def normalise(aux: dict[str, Any]) -> dict[str, float]:
    """Per-unit metrics from summed ``aux``: every entry divided by ``aux['weight']``."""
    w = aux["weight"]
    return {k: v / w for k, v in aux.items() if k != "weight"}


class TransformedWindowObjective(WindowObjective):
    """Windows of ``window_length()`` raw tokens, each turned into fixed-length features
    by ``transform(window, rng)`` (a noising function) inside the data pipeline; ``window``
    holds the 1-D ``tokens``, ``segment_ids`` and ``positions`` of one window, and ``rng`` is
    seeded per window (``lmstack.data.pipeline.transformed_windows_iterator``). ``bind``
    sees the tokenizer first (for word starts, sentence ends, special ids)."""

    def window_length(self) -> int:
        return self.cfg.data.seq_len

    def transform(self, window: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def bind(self, tokenizer: Any) -> None:
        """Learn what the transform needs from the tokenizer; default: nothing."""

    def train_batches(self, data: Any) -> Iterator[dict]:
        c = self.cfg
        self.bind(data.tokenizer)
        return transformed_windows_iterator(data.train, window_length=self.window_length(),
                                            batch_size=c.train.batch_size, seed=c.data.seed, transform=self.transform,
                                            rows=data.train_rows)

    def eval_batches(self, data: Any) -> list[dict]:
        c = self.cfg
        if not len(data.val):
            return []
        self.bind(data.tokenizer)
        return transformed_eval_batches(data.val, window_length=self.window_length(),
                                        batch_size=c.eval.batch_size or c.train.batch_size,
                                        max_batches=c.eval.batches, seed=c.data.seed, transform=self.transform)
