"""The DPO family on preference data: one objective, the loss chosen by ``objective.loss_type``.

Paired losses (``data.source=preference``): ``sigmoid`` (DPO, Rafailov et al. 2023; with
``label_smoothing`` > 0 the conservative cDPO), ``robust`` (rDPO), ``hinge`` (SLiC),
``ipo`` (Azar et al. 2023, length-averaged log-ratios), ``sigmoid_norm`` (length-normalised
DPO), ``simpo`` (Meng et al. 2024, reference-free, margin ``gamma``) and ``orpo`` (Hong et al.
2024, reference-free: the chosen reply's token-mean NLL plus ``beta`` times the odds-ratio
term, as TRL's ``ORPOTrainer``). Unpaired (``data.source=kto``): ``kto`` (Ethayarajh et al.
2024), each completion desirable or not, weighted by ``desirable_weight`` /
``undesirable_weight``. The formulas are :mod:`lmstack.preference.losses`.

Each reply's log-probability is summed over its completion tokens only (the chat template's
mask, :mod:`lmstack.objectives.preference_data`): the reply, its end-of-turn token, never
the prompt. Chosen and rejected go through the model in one call of ``2b`` rows. The
reference policy (:mod:`lmstack.objectives.reference`) is the PEFT run's model with its
adapters taken out, or a frozen copy of the starting weights (``init.from``'s) in a full
fine-tune; its log-probabilities are computed in the same pure step, outside the gradient.

KTO's reference point ``z = max(0, mean(log pi - log pi_ref))`` is estimated on the batch's
own completions (TRL estimates it on mismatched prompt/completion pairs of the batch; both
are 0 when the policy equals the reference), per microbatch.

``aux["weight"]`` is the number of pairs (KTO: completions); ``aux`` adds the summed implicit
rewards ``beta * (log pi - log pi_ref)`` (``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``), so the trainer's per-step metrics (every ``aux``
sum divided by the weight) and ``eval.perplexity``'s are TRL's batch means. KTO's ``aux`` is
TRL's KTO metrics: ``rewards/chosen_sum``, ``rewards/rejected_sum`` (``beta * (log pi - log
pi_ref)`` summed over the desirable and the undesirable completions), ``count/chosen``,
``count/rejected`` and ``kl`` (the reference point ``z``); divided by the weight as every
``aux``, the counts are the desirable and undesirable fractions and the sums per completion, so
``rewards/chosen_sum / count/chosen`` is TRL's ``rewards/chosen``, and ``kl`` is ``z`` (under
accumulation, the completion-weighted mean of the microbatches' ``z``). :meth:`DPO.pair_rewards` gives ``eval.pair_accuracy`` the implicit rewards.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp

from lmstack.data.chat import resolve_template
from lmstack.data.formats import PreferencePair, Unpaired, source_problems
from lmstack.data.labelled import ordered_batches, shuffled_batches
from lmstack.data.tokenizers import Tokenizer
from lmstack.objectives.preference_data import (
    PAIR_SEQUENCES,
    UNPAIRED_SEQUENCES,
    Example,
    SequenceExamples,
    counts_note,
    encode_pairs,
    encode_unpaired,
)
from lmstack.objectives.reference import ReferencePolicy
from lmstack.preference.logps import hidden_token_logps
from lmstack.preference.losses import LOSS_TYPES, REFERENCE_FREE, check_loss_options, kto_loss, preference_loss
from lmstack.registry import register

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
KTO_METRICS = ("kl", "rewards/chosen_sum", "rewards/rejected_sum", "count/chosen", "count/rejected")


def reply_logps(model: Any, batch: Mapping[str, jax.Array], sequences: Sequence[str],
                rng: jax.Array | None = None, *, chunk: int = 0) -> list[tuple[jax.Array, jax.Array]]:
    """``(summed log-probs, completion lengths)``, float32 ``[b]`` each, of every sequence
    ``NAME`` in ``sequences`` (``NAME_tokens`` etc. of the batch), through one model call of
    ``len(sequences) * b`` rows: position ``t``'s logits score token ``t + 1`` where its mask is 1;
    ``chunk`` > 0 computes the logits that many positions at a time (``objective.loss_chunk``)."""
    b = batch[f"{sequences[0]}_tokens"].shape[0]
    cat = {k: jnp.concatenate([batch[f"{s}_{k}"] for s in sequences]) for k in ("tokens", "mask", "segment_ids",
                                                                               "positions")}
    hidden, _ = model.hidden(cat["tokens"][:, :-1], positions=cat["positions"][:, :-1],
                             segment_ids=cat["segment_ids"][:, :-1], rng=rng)
    mask = cat["mask"][:, 1:]
    logps = jnp.sum(hidden_token_logps(model, hidden, cat["tokens"][:, 1:], mask, chunk=chunk), axis=-1)
    lengths = jnp.sum(mask.astype(jnp.float32), axis=-1)
    return [(logps[i * b:(i + 1) * b], lengths[i * b:(i + 1) * b]) for i in range(len(sequences))]


@register("objective.dpo")
class DPO:
    """Preference optimisation by ``objective.loss_type`` (see the module docstring)."""

    exact_microbatches = True
    config_defaults = dict(
        chat_template="",  # "": the tokenizer's own; chatml | llama3 | none | a Jinja template
        loss_type="sigmoid",  # sigmoid | robust | hinge | ipo | sigmoid_norm | simpo | orpo | kto
        beta=0.1,  # TRL's default; SimPO's paper uses 2.0-2.5, ORPO's lambda is beta here
        label_smoothing=0.0,  # cDPO / robust DPO's assumed label noise, in [0, 0.5)
        gamma=0.0,  # SimPO's target margin (TRL's simpo_gamma; the SimPO repo's gamma_beta_ratio = gamma / beta)
        desirable_weight=1.0,  # KTO's lambda_D
        undesirable_weight=1.0,  # KTO's lambda_U
        loss_chunk=0,  # > 0: log-probs that many positions at a time, never the full (2b, T, vocab) logits
    )
    config_choices = {"loss_type": LOSS_TYPES}

    def __init__(self, cfg: Any, special_ids: Mapping[str, int] | None = None):
        self.cfg = cfg
        self.reference = ReferencePolicy(cfg)
        o = cfg.objective
        self.uses_reference = o.loss_type not in REFERENCE_FREE
        self.sequences = UNPAIRED_SEQUENCES if o.loss_type == "kto" else PAIR_SEQUENCES

    @classmethod
    def special_tokens(cls, cfg: Any) -> tuple[str, ...]:
        return ()

    @classmethod
    def config_problems(cls, cfg: Any) -> list[str]:
        """Settings this objective cannot train with, found at load time."""
        o = cfg.objective
        want, what = ((Unpaired, "unpaired completions with a desirable label") if o.loss_type == "kto"
                      else (PreferencePair, "preference pairs"))
        out = source_problems(cfg.data, want, f"objective.loss_type={o.loss_type}", what)
        try:
            check_loss_options(o.loss_type, beta=o.beta, label_smoothing=o.label_smoothing, gamma=o.gamma)
        except Exception as e:  # ConfigError: one line naming the key
            out.append(str(e))
        if cfg.model.name != "decoder":
            out.append(f"objective.name=dpo scores replies with a causal language model: use model.name=decoder, "
                       f"not {cfg.model.name!r}")
        return out

    @classmethod
    def encode_records(cls, cfg: Any, tokenizer: Tokenizer, records: Sequence[Any],
                       split: str) -> tuple[list[Example], list[str]]:
        """The records of ``split`` encoded and cut to ``data.seq_len`` tokens
        (:mod:`lmstack.objectives.preference_data`), and a printout line."""
        template = resolve_template(cfg.objective.chat_template, tokenizer, key="objective.chat_template")
        if cfg.objective.loss_type == "kto":
            examples, counts = encode_unpaired(records, tokenizer, template, cfg.data.seq_len)
            what = "completions"
        else:
            examples, counts = encode_pairs(records, tokenizer, template, cfg.data.seq_len)
            what = "pairs"
        return examples, [counts_note(split, counts, what, cfg.data.seq_len)] if records else []

    def _examples(self, examples: list[Example]) -> SequenceExamples:
        return SequenceExamples.stack(examples, self.sequences, self.cfg.data.seq_len)

    def train_batches(self, data: Any) -> Iterator[dict]:
        c = self.cfg
        return shuffled_batches(self._examples(data.train_examples), batch_size=c.train.batch_size, seed=c.data.seed,
                                rows=data.train_rows)

    def eval_batches(self, data: Any) -> list[dict]:
        c = self.cfg
        if not data.val_examples:
            return []
        return ordered_batches(self._examples(data.val_examples), batch_size=c.eval.batch_size or c.train.batch_size,
                               max_batches=c.eval.batches)

    # --- frozen reference ----------------------------------------------------------

    def attach(self, model: Any, trainable: Any) -> None:
        if self.uses_reference:
            self.reference.attach(model, trainable)

    def start(self, run: Any, state: dict) -> dict:
        return self.reference.start(run, state) if self.uses_reference else state

    # --- the loss ------------------------------------------------------------------

    def _logps(self, model: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None):
        chunk = self.cfg.objective.loss_chunk
        policy = reply_logps(model, batch, self.sequences, rng, chunk=chunk)
        ref = (reply_logps(self.reference.model(model), batch, self.sequences, chunk=chunk)
               if self.uses_reference else None)
        return policy, ref

    def pair_rewards(self, model: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array]:
        """The implicit rewards ``beta * (log pi - log pi_ref)`` of each row's chosen and rejected
        reply (reference-free losses: ``beta`` times the length-averaged log-probability, as TRL's
        CPO / ORPO trainers report), read by ``eval.pair_accuracy``."""
        policy, ref = self._logps(model, batch, rng)
        beta = self.cfg.objective.beta
        if ref is None:
            return tuple(beta * lp / jnp.maximum(n, 1.0) for lp, n in policy)
        return tuple(beta * (lp - r) for (lp, _), (r, _) in zip(policy, ref))

    def loss_fn(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array | None):
        o = self.cfg.objective
        policy, ref = self._logps(model, batch, rng)
        real = (batch[f"{self.sequences[0]}_segment_ids"][:, 0] > 0).astype(jnp.float32)  # padding rows: segment 0
        if o.loss_type == "kto":
            (lp, _), (rp, _) = policy[0], ref[0]
            losses, metrics = kto_loss(lp, rp, batch["desirable"] > 0, lp - rp, jnp.zeros_like(lp), beta=o.beta,
                                       desirable_weight=o.desirable_weight, undesirable_weight=o.undesirable_weight,
                                       valid_b=real > 0)
            weight = jnp.sum(real)
            # the trainer divides every aux sum by the weight: kl * weight comes back as the
            # completion-weighted mean of the microbatches' reference points
            aux = {k: metrics[k] for k in KTO_METRICS if k != "kl"}
            return jnp.sum(losses * real), {"weight": weight, "kl": metrics["kl"] * weight, **aux}
        (pc, lc), (pr, lr) = policy
        rc, rr = (None, None) if ref is None else (ref[0][0], ref[1][0])
        losses, metrics = preference_loss(o.loss_type, pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr,
                                          beta=o.beta, label_smoothing=o.label_smoothing, gamma=o.gamma)
        if o.loss_type == "orpo":  # the SFT term on the chosen reply (token-mean NLL, as TRL's ORPOTrainer)
            losses = losses - pc / jnp.maximum(lc, 1.0)
        aux = {k: jnp.sum(metrics[k] * real) for k in PAIR_METRICS}
        return jnp.sum(losses * real), {"weight": jnp.sum(real), **aux}
