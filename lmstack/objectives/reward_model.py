"""Reward models: a scalar score per (prompt, reply), trained Bradley-Terry on preference pairs.

The model is a family with a one-output sequence-classification head (``model.num_labels=1``:
the decoder's bias-free ``score`` on the last non-padding token, as Hugging Face
``LlamaForSequenceClassification`` with ``num_labels=1``; the encoder's ``classifier``);
``init.from`` a language model adds the head fresh. The reward of a reply is
``model.classify(tokens, segment_ids)[:, 0]`` of the prompt plus the reply, rendered through
the run's chat template (``objective.chat_template``, as :mod:`lmstack.objectives.sft`) and
cut to ``data.seq_len`` tokens (:mod:`lmstack.objectives.preference_data`).

Records are :class:`lmstack.data.formats.PreferencePair` (``data.source=preference``). The
loss per pair is TRL ``RewardTrainer``'s ``-log sigmoid(r_c - r_r - margin)`` (the record's
``margin``, 0 without one) plus ``objective.center_rewards_coefficient * (r_c + r_r)^2``
(:func:`lmstack.preference.reward.bradley_terry_loss`), summed over the batch's pairs;
``aux["weight"]`` is the number of pairs, and ``aux`` adds the summed ``accuracy``
(``r_c > r_r``), ``margin`` (``r_c - r_r``), ``rewards/chosen`` and ``rewards/rejected``.
Chosen and rejected go through the model in one call (the pair's two rows stacked on the
batch axis), as TRL concatenates them.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp

from lmstack.data.chat import resolve_template
from lmstack.data.formats import PreferencePair, source_problems
from lmstack.data.labelled import ordered_batches, shuffled_batches
from lmstack.data.tokenizers import Tokenizer
from lmstack.objectives.preference_data import (
    PAIR_SEQUENCES,
    Example,
    SequenceExamples,
    counts_note,
    encode_pairs,
)
from lmstack.preference.reward import bradley_terry_loss
from lmstack.registry import register


def pair_rewards(model: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """``(r_chosen, r_rejected)``, float32 ``[b]``: the one-output head's score of each row's
    chosen and rejected sequence, both through one ``model.classify`` call of ``2b`` rows."""
    b = batch["chosen_tokens"].shape[0]
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    segment_ids = jnp.concatenate([batch["chosen_segment_ids"], batch["rejected_segment_ids"]])
    rewards = model.classify(tokens, segment_ids, rng=rng)[:, 0]
    return rewards[:b], rewards[b:]


@register("objective.reward_model")
class RewardModel:
    """Bradley-Terry reward-model training on preference pairs (see the module docstring)."""

    exact_microbatches = True
    config_defaults = dict(
        chat_template="",  # "": the tokenizer's own; chatml | llama3 | none | a Jinja template
        center_rewards_coefficient=0.0,  # > 0: add coef * (r_c + r_r)^2 per pair (Eisenstein et al. 2023; TRL)
    )
    config_choices: dict[str, tuple] = {}

    def __init__(self, cfg: Any, special_ids: Mapping[str, int] | None = None):
        self.cfg = cfg

    @classmethod
    def special_tokens(cls, cfg: Any) -> tuple[str, ...]:
        return ()

    @classmethod
    def config_problems(cls, cfg: Any) -> list[str]:
        """Settings this objective cannot train with, found at load time."""
        out = source_problems(cfg.data, PreferencePair, "objective.reward_model", "preference pairs")
        if cfg.model.get("num_labels") != 1:
            what = ("has no score head" if "num_labels" not in cfg.model
                    else f"has model.num_labels={cfg.model.num_labels}")
            out.append(f"objective.reward_model scores each reply with one number, but model.name={cfg.model.name!r} "
                       f"{what}: use model.decoder or model.encoder with --config.model.num_labels=1")
        if cfg.objective.center_rewards_coefficient < 0:
            out.append(f"objective.center_rewards_coefficient={cfg.objective.center_rewards_coefficient}: must be "
                       f">= 0 (0: no centring term)")
        return out

    @classmethod
    def encode_records(cls, cfg: Any, tokenizer: Tokenizer, records: Sequence[PreferencePair],
                       split: str) -> tuple[list[Example], list[str]]:
        """The pairs of ``split`` encoded and cut to ``data.seq_len`` tokens
        (:func:`lmstack.objectives.preference_data.encode_pairs`), and a printout line."""
        template = resolve_template(cfg.objective.chat_template, tokenizer, key="objective.chat_template")
        examples, counts = encode_pairs(records, tokenizer, template, cfg.data.seq_len)
        return examples, [counts_note(split, counts, "pairs", cfg.data.seq_len)] if records else []

    def _examples(self, examples: list[Example]) -> SequenceExamples:
        return SequenceExamples.stack(examples, PAIR_SEQUENCES, self.cfg.data.seq_len)

    def train_batches(self, data: Any) -> Iterator[dict]:
        """Endless batches of ``train.batch_size`` pairs, each epoch reshuffled (seeded); a
        checkpointable grain iterator."""
        c = self.cfg
        return shuffled_batches(self._examples(data.train_examples), batch_size=c.train.batch_size, seed=c.data.seed,
                                rows=data.train_rows)

    def eval_batches(self, data: Any) -> list[dict]:
        """The held-out pairs in order (at most ``eval.batches`` batches, 0: all), the last
        batch filled with padding rows."""
        c = self.cfg
        if not data.val_examples:
            return []
        return ordered_batches(self._examples(data.val_examples), batch_size=c.eval.batch_size or c.train.batch_size,
                               max_batches=c.eval.batches)

    def pair_rewards(self, model: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array]:
        """The rewards of each row's chosen and rejected reply (:func:`pair_rewards`), read by
        ``eval.pair_accuracy``."""
        return pair_rewards(model, batch, rng)

    def loss_fn(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array | None):
        chosen, rejected = pair_rewards(model, batch, rng)
        losses, metrics = bradley_terry_loss(
            chosen, rejected, margin=batch["margin"],
            center_rewards_coefficient=self.cfg.objective.center_rewards_coefficient)
        real = (batch["chosen_segment_ids"][:, 0] > 0).astype(jnp.float32)  # padding rows: segment 0
        aux = {k: jnp.sum(metrics[k] * real) for k in ("accuracy", "margin", "rewards/chosen", "rewards/rejected")}
        return jnp.sum(losses * real), {"weight": jnp.sum(real), **aux}
