"""``lmstack sample``: continue a prompt with a trained model (from training or a workdir)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from lmstack.config import ConfigError, load_saved_config
from lmstack.data.tokenizers import Tokenizer, load_tokenizer
from lmstack.generate import generate
from lmstack.run import restore_checkpoint
from lmstack.sharding import make_mesh


def continue_text(model: nnx.Module, tokenizer: Tokenizer, prompt_ids: list[int], *, max_new_tokens: int,
                  temperature: float, top_k: int, top_p: float, seed: int, num_samples: int = 1) -> list[str]:
    """Decoded continuations (prompt included) of one prompt, ``num_samples`` times."""
    limit = model.cfg.max_seq_len if model.cfg.style == "gpt2" else None
    if limit is not None:
        max_new_tokens = max(1, min(max_new_tokens, limit - len(prompt_ids)))
    prompt = np.asarray([prompt_ids] * num_samples, np.int32)
    out = generate(model, prompt, max_new_tokens=max_new_tokens, rng=jax.random.key(seed),
                   temperature=temperature, top_k=top_k, top_p=top_p)
    head = tokenizer.decode(prompt_ids)
    return [head + tokenizer.decode([int(t) for t in row]) for row in np.asarray(out)]


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """The prompt's ids, after a bos where the tokenizer has one (as documents start in training)."""
    ids = tokenizer.encode(text)
    return [tokenizer.bos_id, *ids] if tokenizer.bos_id is not None else ids


def sample_workdir(workdir: str | Path, prompt: str, *, step: int | None = None, **sampling: Any) -> list[str]:
    """Continuations of ``prompt`` by the checkpoint at ``step`` (default: latest) in ``workdir``."""
    workdir = Path(workdir)
    cfg = load_saved_config(workdir)
    tokenizer = load_tokenizer(workdir / "tokenizer")
    ids = encode_prompt(tokenizer, prompt)
    if not ids:
        raise ConfigError(f"--prompt is empty and the tokenizer of {str(workdir)!r} has no bos token to start from: "
                          "pass --prompt TEXT")
    graphdef, state, _ = restore_checkpoint(cfg, workdir, step, make_mesh({"data": 1, "fsdp": 1, "tensor": 1}))
    model = nnx.merge(graphdef, state["params"], state["frozen"])
    return continue_text(model, tokenizer, ids, **sampling)
