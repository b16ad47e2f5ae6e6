"""Preference records as token sequences: each reply after its prompt through the chat template,
with a completion mask, and batches of them (shared by the reward model and the DPO family).

A reply is encoded as SFT encodes a conversation (:func:`lmstack.objectives.sft.encode_conversation`
with ``loss_on="last_turn"``): the prompt plus the reply rendered by the run's chat template
and encoded without added special tokens. Its ``mask`` is 1 on what the template writes after
the prompt rendered with the generation prompt: the reply's text, its end-of-turn token
(``<|im_end|>``, ``<|eot_id|>``) and whatever the template ends the turn with (ChatML's
newline), as TRL's ``DPOTrainer`` takes the completion as the full rendering minus the prompt
rendering; the prompt (and the assistant header) is 0. The prompt's rendering must be a
prefix of the whole in text and tokens, else a DataError names the record.

Sequences longer than ``length`` tokens keep the prompt and lose the reply's end (counted);
a record whose prompt alone leaves no room for a reply token is dropped (counted).

A :class:`PreferencePair` gives the sequences ``chosen`` and ``rejected`` and the scalar
``margin`` (0 where the record has none: ``r_c - r_r - 0`` is the plain Bradley-Terry
argument); an :class:`Unpaired` (KTO) example the sequence ``completion`` and the scalar
``desirable`` (1 or 0). Batches hold, for each sequence NAME, one sequence per row:
``NAME_tokens``, ``NAME_mask``, ``NAME_segment_ids`` (1 on tokens, 0 on padding) and
``NAME_positions`` (0, 1, ... on tokens, 0 on padding), int32 ``(b, length)``, and the
scalars ``(b,)``. Row ``i`` of ``chosen_*`` and of ``rejected_*`` is one pair. Padding rows
(the last held-out batch) have segment 0 everywhere and scalars 0.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from lmstack.data.formats import PreferencePair, Unpaired
from lmstack.data.tokenizers import Tokenizer
from lmstack.objectives.sft import encode_conversation

Example = dict[str, np.ndarray]
Batch = dict[str, np.ndarray]
PAIR_SEQUENCES = ("chosen", "rejected")
UNPAIRED_SEQUENCES = ("completion",)


def encode_reply(prompt: list[dict], reply: dict, tokenizer: Tokenizer, template: str, *,
                 where: str = "") -> Example:
    """``tokens`` and ``mask`` (int32 ``[n]``) of ``prompt + [reply]`` rendered by ``template``;
    ``mask`` is 1 on the reply's tokens and the end of its turn (module docstring). Raises
    DataError (naming ``where``) when the prompt's rendering is not a prefix of the whole or
    the reply renders to no token."""
    ex = encode_conversation(prompt + [reply], tokenizer, template, loss_on="last_turn", where=where)
    return {"tokens": ex["tokens"], "mask": ex["loss_mask"]}


def _encode(prompt: list[dict], replies: Mapping[str, dict], scalars: Mapping[str, np.generic], length: int,
            tokenizer: Tokenizer, template: str, where: str, counts: dict[str, int]) -> Example | None:
    """One record's sequences (``NAME_tokens``, ``NAME_mask``) cut to ``length``, and its
    scalars; None (counted) when the prompt leaves no room for a reply token."""
    encoded = {name: encode_reply(prompt, reply, tokenizer, template, where=where) for name, reply in replies.items()}
    prompt_length = int(np.argmax(next(iter(encoded.values()))["mask"]))  # the same prompt before every reply
    counts["records"] += 1
    if prompt_length >= length:
        counts["dropped"] += 1
        return None
    out: Example = {}
    for name, e in encoded.items():
        n = len(e["tokens"])
        counts["sequences"] += 1
        counts["truncated"] += n > length
        counts["tokens_dropped"] += max(n - length, 0)
        out[f"{name}_tokens"], out[f"{name}_mask"] = e["tokens"][:length], e["mask"][:length]
    if len(replies) == 2 and np.array_equal(*(out[f"{n}_tokens"] for n in replies)):
        counts["tied"] += 1  # both replies cut back to the same tokens
    return {**out, **scalars}


def _counts() -> dict[str, int]:
    return dict(records=0, dropped=0, sequences=0, truncated=0, tokens_dropped=0, tied=0)


def encode_pairs(records: Sequence[PreferencePair], tokenizer: Tokenizer, template: str,
                 length: int) -> tuple[list[Example], dict[str, int]]:
    """Each pair as ``chosen_tokens``, ``chosen_mask``, ``rejected_tokens``, ``rejected_mask``
    (int32, at most ``length``) and ``margin`` (float32), and the counts: ``records``,
    ``dropped`` (prompt too long), ``sequences``, ``truncated`` (sequences cut), ``tokens_dropped``
    and ``tied`` (pairs whose two sequences are equal after the cut)."""
    counts = _counts()
    out = [_encode(r.prompt, {"chosen": r.chosen, "rejected": r.rejected},
                   {"margin": np.float32(r.margin or 0.0)}, length, tokenizer, template, r.where, counts)
           for r in records]
    return [e for e in out if e is not None], counts


def encode_unpaired(records: Sequence[Unpaired], tokenizer: Tokenizer, template: str,
                    length: int) -> tuple[list[Example], dict[str, int]]:
    """Each KTO example as ``completion_tokens``, ``completion_mask`` (its last message is the
    reply) and ``desirable`` (int32 1/0), and the counts of :func:`encode_pairs` (``tied`` 0)."""
    counts = _counts()
    out = [_encode(r.messages[:-1], {"completion": r.messages[-1]}, {"desirable": np.int32(r.desirable)}, length,
                   tokenizer, template, r.where, counts) for r in records]
    return [e for e in out if e is not None], counts


def counts_note(split: str, counts: Mapping[str, int], what: str, length: int) -> str:
    """The printout line of :func:`encode_pairs` / :func:`encode_unpaired` counts."""
    note = (f"{split}: {counts['records']:,} {what}, {counts['truncated']:,} of {counts['sequences']:,} sequences cut "
            f"to {length} tokens ({counts['tokens_dropped']:,} reply tokens dropped)")
    if counts["dropped"]:
        note += f", {counts['dropped']:,} dropped: the prompt alone fills {length} tokens"
    if counts["tied"]:
        note += f", {counts['tied']:,} left with identical chosen and rejected tokens"
    return note


@dataclasses.dataclass(frozen=True)
class SequenceExamples:
    """Encoded examples stacked, one per row: ``tokens[NAME]`` and ``masks[NAME]`` int32
    ``(n, length)`` zero-padded, ``lengths[NAME]`` ``(n,)``, and ``scalars`` ``(n,)`` each.
    Used with :func:`lmstack.data.labelled.shuffled_batches` / ``ordered_batches``."""

    tokens: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    scalars: dict[str, np.ndarray]

    @classmethod
    def stack(cls, examples: Sequence[Example], names: Sequence[str], length: int) -> "SequenceExamples":
        """The examples of :func:`encode_pairs` (``names`` = :data:`PAIR_SEQUENCES`) or
        :func:`encode_unpaired` (:data:`UNPAIRED_SEQUENCES`) as arrays of width ``length``."""
        tokens, masks, lengths = {}, {}, {}
        for name in names:
            tokens[name] = np.zeros((len(examples), length), np.int32)
            masks[name] = np.zeros((len(examples), length), np.int32)
            lengths[name] = np.array([len(e[f"{name}_tokens"]) for e in examples], np.int32)
            for r, e in enumerate(examples):
                tokens[name][r, :lengths[name][r]] = e[f"{name}_tokens"]
                masks[name][r, :lengths[name][r]] = e[f"{name}_mask"]
        sequence_keys = {f"{n}_{k}" for n in names for k in ("tokens", "mask")}
        scalar_keys = [k for k in (examples[0] if examples else {}) if k not in sequence_keys]
        scalars = {k: np.array([e[k] for e in examples]) for k in scalar_keys}
        return cls(tokens, masks, lengths, scalars)

    def __len__(self) -> int:
        return len(next(iter(self.lengths.values())))

    def rows(self, index: np.ndarray) -> Batch:
        """The batch of rows ``index`` in the layout of the module docstring."""
        batch: Batch = {}
        for name, tokens in self.tokens.items():
            positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), (len(index), tokens.shape[1]))
            segment_ids = (positions < self.lengths[name][index][:, None]).astype(np.int32)
            batch[f"{name}_tokens"] = tokens[index]
            batch[f"{name}_mask"] = self.masks[name][index]
            batch[f"{name}_segment_ids"] = segment_ids
            batch[f"{name}_positions"] = positions * segment_ids
        batch.update({k: v[index] for k, v in self.scalars.items()})
        return batch
