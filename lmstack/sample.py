"""``lmstack sample``: continue a prompt with a trained model (from training or a workdir)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from lmstack.config import ConfigError
from lmstack.data.tokenizers import Tokenizer, with_bos
from lmstack.generate import generate_sliding
from lmstack.run import Run
from lmstack.sharding import make_mesh


def context_window(model: nnx.Module) -> int:
    """The most tokens the model conditions on: its ``max_seq_len`` (learned positions end
    there; RoPE models were trained on no more)."""
    return int(model.cfg.max_seq_len)


def continue_text(model: nnx.Module, tokenizer: Tokenizer, prompt_ids: list[int], *, max_new_tokens: int,
                  temperature: float, top_k: int, top_p: float, seed: int, num_samples: int = 1) -> list[str]:
    """Decoded continuations (prompt included) of one prompt, ``num_samples`` times, each
    exactly ``max_new_tokens`` tokens long: past the model's window the context slides
    (:func:`lmstack.generate.generate_sliding`)."""
    prompt = np.asarray([prompt_ids] * num_samples, np.int32)
    out = generate_sliding(model, prompt, max_new_tokens=max_new_tokens, rng=jax.random.key(seed),
                           window=context_window(model), temperature=temperature, top_k=top_k, top_p=top_p)
    head = tokenizer.decode(prompt_ids)
    return [head + tokenizer.decode([int(t) for t in row]) for row in np.asarray(out)]


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """The prompt's ids, after a bos where the tokenizer starts documents with one (as in training)."""
    return with_bos(tokenizer, tokenizer.encode(text))


def open_for_generation(workdir: str | Path, step: int | None = None) -> tuple[Run, nnx.Module]:
    """The run in ``workdir`` on one device and its model at ``step`` (default: latest);
    ConfigError when its model family cannot generate."""
    run = Run.open(workdir, mesh=make_mesh({"data": 1, "fsdp": 1, "tensor": 1}))
    if not hasattr(run.model_cls, "init_cache"):
        raise ConfigError(f"the model of {str(workdir)!r} is model.{run.spec.model['name']}, which does not generate "
                          f"text: sample from a decoder's workdir")
    return run, run.model(run.restore(step))


def sample_workdir(workdir: str | Path, prompt: str, *, step: int | None = None, **sampling: Any) -> list[str]:
    """Continuations of ``prompt`` by the checkpoint at ``step`` (default: latest) in ``workdir``."""
    run, model = open_for_generation(workdir, step)
    tokenizer = run.spec.tokenizer
    ids = encode_prompt(tokenizer, prompt)
    if not ids:
        raise ConfigError(f"--prompt is empty and the tokenizer of {str(workdir)!r} has no bos token to start from: "
                          "pass --prompt TEXT")
    window = context_window(model)
    if len(ids) > window:
        print(f"lmstack: note: the prompt has {len(ids)} tokens; the model's context is {window}, so its last "
              f"{window} condition the continuation", file=sys.stderr)
    return continue_text(model, tokenizer, ids, **sampling)
