"""``lmstack chat``: talk to a checkpoint through its chat template, the reply streamed.

The conversation is rendered with the run's chat template (the model's own, from
``tokenizer_config.json`` or the GGUF metadata, or a built-in by name) exactly as
transformers' ``apply_chat_template(..., add_generation_prompt=True)`` renders it, encoded
without adding special tokens (the template writes them), and continued token by token: one
compiled prefill, then one compiled decode step per token over a KV cache, until an
end-of-turn id (the tokenizer's eos, and ``<|im_end|>`` / ``<|eot_id|>`` / ``<|end|>`` where the
vocabulary has them) or ``max_new_tokens``.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lmstack.config import ConfigError
from lmstack.data.chat import render_chat, resolve_template
from lmstack.data.tokenizers import Tokenizer
from lmstack.generate import sample_token

# End-of-turn markers of the common chat formats (ChatML, Llama 3, Phi-3).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>")


def stop_ids(tokenizer: Tokenizer) -> set[int]:
    """The ids that end a reply: eos, and every end-of-turn marker the vocabulary has."""
    ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    for marker in END_OF_TURN:
        found = tokenizer.encode(marker)
        if len(found) == 1:
            ids.add(found[0])
    return ids


def prompt_ids(tokenizer: Tokenizer, messages: list[dict], template: str = "") -> list[int]:
    """The conversation rendered for a reply (``add_generation_prompt``) and encoded."""
    names = getattr(tokenizer, "special_tokens_map", {})
    text = render_chat(resolve_template(template, tokenizer, key="--template"), messages, add_generation_prompt=True,
                       bos_token=names.get("bos_token", ""), eos_token=names.get("eos_token", ""))
    return tokenizer.encode(text)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _prefill(graphdef, state, ids_bt, *, max_len):
    model = nnx.merge(graphdef, state)
    logits, cache = model(ids_bt, cache=model.init_cache(ids_bt.shape[0], max_len))
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _decode(graphdef, state, tok_b, cache):
    logits, cache = nnx.merge(graphdef, state)(tok_b[:, None], cache=cache)
    return logits[:, -1], cache


def stream_tokens(model: nnx.Module, ids: list[int], *, max_new_tokens: int, stop: set[int], temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> Iterator[int]:
    """Yield the reply's ids one at a time (the stop id is not yielded). The prompt plus the
    reply must fit the model's context (``max_seq_len``): ConfigError otherwise."""
    window = int(model.cfg.max_seq_len)
    if len(ids) >= window:
        raise ConfigError(f"the conversation is {len(ids)} tokens, the model's context is {window}: "
                          f"start a new conversation or shorten the messages")
    max_new_tokens = min(max_new_tokens, window - len(ids))
    graphdef, state = nnx.split(model)
    logits, cache = _prefill(graphdef, state, jnp.asarray([ids], jnp.int32), max_len=len(ids) + max_new_tokens)
    rng = jax.random.key(seed)
    for i in range(max_new_tokens):
        tok = sample_token(logits, jax.random.fold_in(rng, i), temperature=temperature, top_k=top_k, top_p=top_p)
        t = int(tok[0])
        if t in stop:
            return
        yield t
        if i + 1 < max_new_tokens:
            logits, cache = _decode(graphdef, state, tok, cache)


def reply(model: nnx.Module, tokenizer: Tokenizer, messages: list[dict], *, template: str = "",
          on_text: Callable[[str], None] | None = None, **sampling) -> str:
    """The assistant's reply to ``messages``; ``on_text`` receives each new piece of text as it is
    decoded (a piece is held back while it ends inside a multi-byte character)."""
    out: list[int] = []
    shown = ""
    for t in stream_tokens(model, prompt_ids(tokenizer, messages, template), stop=stop_ids(tokenizer), **sampling):
        out.append(t)
        text = tokenizer.decode(out)
        if on_text is not None and not text.endswith("\ufffd"):
            on_text(text[len(shown):])
            shown = text
    text = tokenizer.decode(out)
    if on_text is not None and text != shown:
        on_text(text[len(shown):])
    return text


def greedy_replies(model: nnx.Module, tokenizer: Tokenizer, conversations: Sequence[list[dict]], *,
                   max_new_tokens: int, template: str = "", batch_size: int = 16) -> list[str]:
    """The greedy reply to each conversation, as :func:`reply` at temperature 0 gives it one at a
    time, cut before the first end-of-turn marker (:data:`END_OF_TURN`, also where the tokenizer
    spells it in several tokens, as a byte or SentencePiece vocabulary does). Batched: the
    prompts are left-padded to the longest and decoded ``batch_size`` rows at a time
    (:func:`lmstack.rollout.sample_rollouts`; one compile per call, the last batch filled with
    repeats). ConfigError when the longest prompt plus ``max_new_tokens`` exceeds the model's context."""
    from lmstack.rollout import sample_rollouts

    prompts = [prompt_ids(tokenizer, messages, template) for messages in conversations]
    if not prompts:
        return []
    longest = max(map(len, prompts))
    window = int(model.cfg.max_seq_len)
    if longest + max_new_tokens > window:
        raise ConfigError(f"the longest conversation is {longest} tokens, which with max_new_tokens={max_new_tokens} "
                          f"exceeds the model's context of {window}: lower max_new_tokens or shorten the messages")
    graphdef, state = nnx.split(model)
    stops = sorted(stop_ids(tokenizer))
    out = []
    for first in range(0, len(prompts), batch_size):
        rows = prompts[first:first + batch_size]
        keep = len(rows)
        rows += [rows[-1]] * (batch_size - keep)
        rollout = sample_rollouts(graphdef, state, rows, n=1, max_new_tokens=max_new_tokens, max_prompt_len=longest,
                                  rng=jax.random.key(0), stop_ids=stops, temperature=0.0)
        tokens, lengths, stopped = jax.device_get((rollout.completion_tokens, rollout.completion_lengths,
                                                   rollout.stopped))
        for r in range(keep):
            text = tokenizer.decode(tokens[r, :lengths[r] - int(stopped[r])].tolist())
            for marker in END_OF_TURN:
                text = text.split(marker)[0]
            out.append(text)
    return out


def chat_workdir(workdir: str | Path, *, prompt: str | None, system: str = "", template: str = "",
                 step: int | None = None, **sampling) -> int:
    """``lmstack chat``: one reply to ``prompt``, or a conversation read line by line from stdin."""
    from lmstack.sample import open_for_generation

    run, model = open_for_generation(workdir, step)
    tokenizer = run.spec.tokenizer
    messages = [{"role": "system", "content": system}] if system else []

    def say(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    turns = [prompt] if prompt is not None else iter(lambda: _read_line(), None)
    for text in turns:
        messages.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, messages, template=template, on_text=say, **sampling)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": answer})
    return 0


def _read_line() -> str | None:
    try:
        line = input("> ")
    except EOFError:
        return None
    return line if line.strip() not in ("/exit", "/quit") else None

