"""Supervised fine-tuning: conversations through a chat template, the loss on the replies.

Each conversation (a :class:`lmstack.data.formats.Conversation` from ``data.source`` =
``alpaca``, ``sharegpt`` or ``prompt_completion``) is rendered with the run's chat template
(``objective.chat_template``: empty for the tokenizer's own, as ``lmstack chat`` uses it;
``chatml``, ``llama3``, ``none`` or a Jinja string) and encoded without added special tokens,
as transformers' ``apply_chat_template(tokenize=True)``.

Which tokens carry loss (``objective.loss_on``): ``assistant`` (every assistant message),
``last_turn`` (the last one) or ``all``. An assistant message's tokens are those between the
conversation before it rendered with the generation prompt and the conversation up to it
rendered without, so the reply's end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``) is
trained and the assistant header is not, as TRL's ``assistant_only_loss`` and LLaMA-Factory
mask. Each prefix rendering must be a prefix of the whole rendering, in text and in tokens: a
template that renders earlier turns differently, or a tokenizer that merges across a turn
boundary, is a one-line DataError naming the record.

Examples longer than ``seq_len + 1`` tokens are cut (the counts go into the run's printout)
and packed into rows of ``seq_len + 1`` (``objective.packing``: grain's ``first_fit`` or
``best_fit`` over ``objective.packing_bins`` open rows, or ``none``) with segment ids and
positions restarting per example, so no token attends to another example. Batches are
causal LM batches (``tokens``, ``segment_ids``, ``positions``) with a ``loss_mask`` (1 where
the token is a target that carries loss), read by :class:`lmstack.objectives.causal_lm.CausalLM`'s loss.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from lmstack.data.chat import render_chat, resolve_template
from lmstack.data.formats import Conversation, is_format, record_type
from lmstack.data.pipeline import PACKINGS, packed_examples_dataset
from lmstack.data.sources import DataError
from lmstack.data.tokenizers import Tokenizer
from lmstack.objectives.causal_lm import CausalLM
from lmstack.registry import names, register

LOSS_ON = ("assistant", "last_turn", "all")
Example = dict[str, np.ndarray]


def render(template: str, messages: list[dict], tokenizer: Tokenizer, *, add_generation_prompt: bool) -> str:
    """``messages`` rendered by ``template`` with the tokenizer's special token texts
    (``bos_token``, ``eos_token``, ... from an HF tokenizer's ``special_tokens_map``)."""
    names_ = getattr(tokenizer, "special_tokens_map", {})
    return render_chat(template, messages, add_generation_prompt=add_generation_prompt, **names_)


def encode_conversation(
    messages: list[dict], tokenizer: Tokenizer, template: str, *, loss_on: str = "assistant", where: str = ""
) -> Example:
    """``tokens`` and ``loss_mask`` (int32 ``[n]``, 1 on the tokens that carry loss; see the
    module docstring) of one conversation. ``where`` names the record in errors. Raises
    DataError when a prefix rendering is not a prefix of the whole (in text or tokens) or
    nothing carries loss."""
    if loss_on not in LOSS_ON:
        raise DataError(f"objective.loss_on: {loss_on!r} is not one of {', '.join(LOSS_ON)}")
    at = f"{where}: " if where else ""

    def rendered(n: int, generation: bool) -> str:
        try:
            return render(template, messages[:n], tokenizer, add_generation_prompt=generation)
        except DataError as e:
            raise DataError(f"{at}{e}") from None

    text = rendered(len(messages), False)
    ids = tokenizer.encode(text)

    def prefix_length(n: int, generation: bool) -> int:
        """Tokens of ``messages[:n]`` rendered (with the generation prompt when ``generation``)."""
        head = rendered(n, generation)
        boundary = f"messages[:{n}]" + (" with the generation prompt" if generation else "")
        if not text.startswith(head):
            raise DataError(f"{at}the chat template renders {boundary} differently when later messages follow, "
                            f"so the reply tokens cannot be found: use a template whose renderings extend each "
                            f"other (chatml, llama3)")
        head_ids = tokenizer.encode(head)
        if ids[:len(head_ids)] != head_ids:
            raise DataError(f"{at}the {tokenizer.kind} tokenizer merges text across the end of {boundary} "
                            f"({head[-20:]!r} + {text[len(head):len(head) + 20]!r}), so the reply tokens cannot "
                            f"be told apart: use a template that ends each turn with a special token or newline")
        return len(head_ids)

    mask = np.zeros(len(ids), np.int32)
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if loss_on == "all":
        mask[:] = 1
    for i in replies[-1:] if loss_on == "last_turn" else replies if loss_on == "assistant" else ():
        mask[prefix_length(i, True):prefix_length(i + 1, False)] = 1
    if not mask[1:].any():  # the first token is never a target
        why = ("the conversation has no assistant message" if not replies else
               "the chat template renders none of the assistant messages' tokens")
        raise DataError(f"{at}no token carries loss (objective.loss_on={loss_on}): {why}: fix the record or the "
                        f"template, or set --config.objective.loss_on=all")
    return {"tokens": np.asarray(ids, np.int32), "loss_mask": mask}


def truncate(examples: Sequence[Example], length: int) -> tuple[list[Example], dict[str, int]]:
    """Each example cut to its first ``length`` tokens, and the counts: ``examples``,
    ``tokens`` (kept), ``trained`` (kept tokens carrying loss), ``truncated`` (examples cut),
    ``dropped`` (tokens cut), ``untrained`` (examples left with no token carrying loss)."""
    out = [{k: v[:length] for k, v in e.items()} for e in examples]
    counts = {
        "examples": len(examples),
        "tokens": sum(len(e["tokens"]) for e in out),
        "trained": int(sum(e["loss_mask"][1:].sum() for e in out)),
        "truncated": sum(len(e["tokens"]) > length for e in examples),
        "dropped": sum(max(len(e["tokens"]) - length, 0) for e in examples),
        "untrained": sum(not e["loss_mask"][1:].any() for e in out),
    }
    return out, counts


def _batch_layout(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The packer's per-feature names -> the causal LM batch (``tokens``, ``segment_ids``,
    ``positions``) plus ``loss_mask``."""
    return {"tokens": batch["tokens"], "segment_ids": batch["tokens_segment_ids"],
            "positions": batch["tokens_positions"], "loss_mask": batch["loss_mask"]}


@register("objective.sft")
class SFT(CausalLM):
    """Supervised fine-tuning on conversations (see the module docstring). The run encodes
    the records once (:meth:`encode_records`, called by :func:`lmstack.run.tokenize`);
    ``data.train_examples`` / ``data.val_examples`` hold the examples."""

    config_defaults = dict(
        CausalLM.config_defaults,
        chat_template="",  # "": the tokenizer's own; chatml | llama3 | none | a Jinja template
        loss_on="assistant",  # assistant | last_turn | all
        packing="first_fit",  # first_fit | best_fit | none
        packing_bins=32,  # open rows the packer fills before it emits them (0: train.batch_size)
    )
    config_choices = {"loss_on": LOSS_ON, "packing": PACKINGS}

    @classmethod
    def config_problems(cls, cfg: Any) -> list[str]:
        """Settings this objective cannot train with, found at load time."""
        if problems := super().config_problems(cfg):
            return problems
        source = cfg.data.source
        if not is_format(source) or record_type(source) is not Conversation:
            chats = ", ".join(n for n in names("format") if record_type(n) is Conversation)
            return [f"objective.name=sft reads conversations, but data.source={source!r} gives "
                    f"{'labelled texts' if is_format(source) else 'documents'}: set --config.data.source to one of "
                    f"{chats} and --config.data.path=FILE"]
        if cfg.objective.packing_bins < 0:
            return [f"objective.packing_bins={cfg.objective.packing_bins}: must be >= 0 (0: train.batch_size)"]
        return []

    @classmethod
    def encode_records(cls, cfg: Any, tokenizer: Tokenizer, records: Sequence[Conversation],
                       split: str) -> tuple[list[Example], list[str]]:
        """The records of ``split`` encoded (:func:`encode_conversation`) and cut to
        ``seq_len + 1`` tokens, and a line for the run's printout with the counts."""
        template = resolve_template(cfg.objective.chat_template, tokenizer, key="objective.chat_template")
        encoded = [encode_conversation(r.messages, tokenizer, template, loss_on=cfg.objective.loss_on, where=r.where)
                   for r in records]
        examples, n = truncate(encoded, cfg.data.seq_len + 1)
        if not examples:
            return [], []
        note = (f"{split}: {n['examples']:,} conversations, {n['tokens']:,} tokens, {n['trained']:,} carry loss "
                f"(loss_on={cfg.objective.loss_on}); {n['truncated']:,} cut to seq_len + 1 = {cfg.data.seq_len + 1} "
                f"({n['dropped']:,} tokens dropped)")
        if n["untrained"]:
            note += f", {n['untrained']:,} of them left with no token carrying loss"
        return examples, [note]

    def _packed(self, examples: list[Example], *, batch_size: int, num_epochs: int | None, drop_remainder: bool):
        c = self.cfg
        length = c.data.seq_len + 1
        return packed_examples_dataset(
            examples, feature_lengths={"tokens": length, "loss_mask": length}, batch_size=batch_size,
            seed=c.data.seed, num_epochs=num_epochs, packing=c.objective.packing,
            num_packing_bins=c.objective.packing_bins, drop_remainder=drop_remainder).map(_batch_layout)

    def train_batches(self, data: Any) -> Iterator[dict]:
        """Endless packed batches of the training examples, reshuffled every epoch; a grain
        iterator whose state is its position, so a resumed run continues exactly."""
        return iter(self._packed(data.train_examples, batch_size=self.cfg.train.batch_size, num_epochs=None,
                                 drop_remainder=True))

    def eval_batches(self, data: Any) -> list[dict]:
        """The validation examples packed once (at most ``eval.batches`` batches, 0: all),
        the last batch filled with padding rows (segment 0)."""
        c = self.cfg
        if not data.val_examples:
            return []
        size = c.eval.batch_size or c.train.batch_size
        batches = []
        for batch in self._packed(data.val_examples, batch_size=size, num_epochs=1, drop_remainder=False):
            batches.append({k: np.pad(v, ((0, size - len(v)), (0, 0))) for k, v in batch.items()})
            if len(batches) == c.eval.batches:
                break
        return batches
