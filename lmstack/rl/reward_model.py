"""A trained reward model as the reward of the rollout objectives (``objective.reward_model``).

TRL ``PPOTrainer``'s ``reward_model``: each rollout row, prompt and completion as the policy
produced them (token ids, never re-tokenised), is scored by a sequence-classification model
with one output: the workdir of an ``objective.reward_model`` run
(:mod:`lmstack.objectives.reward_model`), ``W`` (its latest checkpoint) or ``W@STEP`` as
``init.from`` names a run. Its parameters are read with ``init.from``'s loader
(:func:`lmstack.init_from.open_parent`: parameters only, each tensor placed in its sharding
on the run's mesh), once per process, on first use; they are held here, outside the train
state, so they are never differentiated, get no optimizer state and are not written into
the policy's checkpoints (a resumed run reads them again from ``W``: pin ``W@STEP`` when ``W``
may train on).

The policy and the reward model must share the tokenizer (the same tokenizer identity,
reserved ids and vocabulary size in their run specs; :meth:`FrozenRewardModel.check`).

Rollout rows are the prompt left-padded to ``max_prompt_len``, then the completion, then
padding after its stop token; the reward model reads a sequence from position 0 (its
positions start there; ``last`` pooling reads the last non-padding token, ``cls`` the first),
so :func:`left_aligned` shifts each row to start at 0 before scoring: the row alone, as the
reward-model objective's own batches hold a (prompt, reply) sequence. The score of a row is
``model.classify(tokens, segment_ids)[:, 0]`` (:func:`lmstack.objectives.reward_model.pair_rewards`'s
call), float32, one compile per rollout shape.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmstack.checkpoint import has_checkpoint
from lmstack.config import ConfigError, load_saved_config
from lmstack.init_from import open_parent, parse_init_from
from lmstack.runspec import RunSpec
from lmstack.sharding import RULES

KEY = "objective.reward_model"


def left_aligned(prompt_tokens: jax.Array, prompt_lengths: jax.Array, completion_tokens: jax.Array,
                 completion_mask: jax.Array, pad_id: int | jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rollout rows as sequences that start at position 0: ``(tokens, segment_ids)``, int32
    (rows, P + N) each.

    ``prompt_tokens`` int32 (rows, P), each prompt's ``prompt_lengths`` (rows,) tokens at the
    end (left padding); ``completion_tokens`` int32 (rows, N) and ``completion_mask`` bool
    (rows, N), True on the sampled tokens (the stop token included) and nothing after
    (:class:`lmstack.rollout.Rollout`). Row ``r`` of the output is its prompt's real tokens,
    then its ``completion_mask`` tokens, then ``pad_id`` to the end; ``segment_ids`` is 1 on
    the real tokens and 0 on the padding."""
    p, n = prompt_tokens.shape[1], completion_tokens.shape[1]
    tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1)
    left_pad = p - prompt_lengths.astype(jnp.int32)
    length = prompt_lengths.astype(jnp.int32) + jnp.sum(completion_mask, axis=1, dtype=jnp.int32)
    index = jnp.arange(p + n, dtype=jnp.int32)[None, :]
    moved = jnp.take_along_axis(tokens, jnp.minimum(index + left_pad[:, None], p + n - 1), axis=1)
    real = index < length[:, None]
    return jnp.where(real, moved, pad_id).astype(jnp.int32), real.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _scores(graphdef: nnx.GraphDef, state: nnx.State, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
            completion_tokens: jax.Array, completion_mask: jax.Array, pad_id: jax.Array) -> jax.Array:
    tokens, segment_ids = left_aligned(prompt_tokens, prompt_lengths, completion_tokens, completion_mask, pad_id)
    return nnx.merge(graphdef, state).classify(tokens, segment_ids)[:, 0]


class FrozenRewardModel:
    """The reward model named by ``objective.reward_model`` (see the module docstring).

    Nothing is read when it is built; :meth:`check` reads the reward model's run spec and
    :meth:`scores` loads its weights on first use."""

    def __init__(self, value: str):
        self.value = value
        self._model: tuple[nnx.GraphDef, nnx.State] | None = None

    def check(self, spec: RunSpec, cfg: Any) -> None:
        """Raise ConfigError (one line naming ``objective.reward_model`` and the policy's source)
        unless the value is a trained ``objective.reward_model`` run (one score, every weight in
        its checkpoints) whose tokenizer is the policy's (``spec``: the policy run's spec) and
        whose learned positions, if it has them, cover the rollout rows of ``cfg.objective``;
        FileNotFoundError for a ``W@STEP`` without that checkpoint."""
        source = parse_init_from(self.value, KEY)
        if source.kind != "run":
            raise ConfigError(f"{KEY}={self.value!r} is a {source.kind} source: give the workdir of an "
                              f"objective.reward_model run (W or W@STEP)")
        if not has_checkpoint(source.path):
            raise ConfigError(f"{KEY}={self.value!r} holds no checkpoint: train it first "
                              f"(lmstack train reward_model --workdir {source.path})")
        rm = open_parent(source, KEY).spec
        if rm.model.get("num_labels") != 1:
            raise ConfigError(f"{KEY}={self.value!r}: its model has model.num_labels={rm.model.get('num_labels', 0)}, "
                              f"not the one score of a reward model: give the workdir of an objective.reward_model run")
        peft = load_saved_config(source.path).peft.name
        if peft != "none":
            raise ConfigError(f"{KEY}={self.value!r} was trained with peft.name={peft}, whose checkpoints hold the "
                              f"adapters alone: give a reward model trained with every weight (peft.name=none)")
        if (rm.tokenizer.identity, rm.special_ids, rm.vocab_size) != (spec.tokenizer.identity, spec.special_ids,
                                                                      spec.vocab_size):
            policy = (f"init.from={cfg.init['from']}" if cfg.init["from"] not in ("", "scratch")
                      else f"data.tokenizer.kind={cfg.data.tokenizer.kind}")
            raise ConfigError(f"{KEY}={self.value!r} has another tokenizer than the policy ({policy}): "
                              f"{describe(rm)} against {describe(spec)}; rollouts are scored as token ids, never "
                              f"re-tokenised: train the reward model from the policy's lineage (its init.from)")
        o = cfg.objective
        if rm.model.get("style") == "gpt2" and o.max_prompt_len + o.max_new_tokens > rm.model["max_seq_len"]:
            raise ConfigError(f"{KEY}={self.value!r} has {rm.model['max_seq_len']} learned positions, fewer than "
                              f"objective.max_prompt_len + max_new_tokens = {o.max_prompt_len + o.max_new_tokens}: "
                              f"lower them or use a reward model with more positions")

    def load(self, mesh: Any) -> tuple[nnx.GraphDef, nnx.State]:
        """``(graphdef, state)`` of the reward model, its parameters placed on ``mesh`` by their
        logical axis names (:func:`lmstack.trainstate.abstract_state`); read once."""
        if self._model is None:
            from lmstack.trainstate import abstract_state, build_model_factory  # it imports the objectives

            parent = open_parent(parse_init_from(self.value, KEY), KEY)
            rm = parent.spec
            make, _ = build_model_factory(rm.model_section(), vocab_size=rm.vocab_size,
                                          max_seq_len=rm.model["max_seq_len"], seed=0)
            # called inside the run's mesh (the collect phase, evaluators), where building the
            # abstract state needs the logical-axis rules to turn the variables' names into mesh axes
            with nnx.logical_axis_rules(RULES):
                graphdef, abstract, _ = abstract_state(make, optax.identity(), mesh)
            with jax.set_mesh(mesh):
                params = parent.load_params(abstract["params"])
            self._model = graphdef, params
        return self._model

    def scores(self, rollout: Any, pad_id: int, mesh: Any) -> np.ndarray:
        """float32 (rows,): the reward model's score of each row of ``rollout``
        (:class:`lmstack.rollout.Rollout`), left-aligned (:func:`left_aligned`)."""
        graphdef, state = self.load(mesh)
        with jax.set_mesh(mesh):
            out = _scores(graphdef, state, rollout.prompt_tokens, rollout.prompt_lengths, rollout.completion_tokens,
                          rollout.completion_mask, jnp.int32(pad_id))
        return np.asarray(jax.device_get(out), np.float32)


def describe(spec: RunSpec) -> str:
    """A run spec's tokenizer in a few words: kind, identity prefix, reserved ids, vocabulary."""
    return (f"{spec.tokenizer.kind} tokenizer {spec.tokenizer.identity[:16]} with {len(spec.special_ids)} reserved "
            f"ids, {spec.vocab_size} ids")
