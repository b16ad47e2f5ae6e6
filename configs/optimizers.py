"""Optimizer recipes: the AdamW settings of published training runs, set on a config's
``optimizer`` section (lmstack's AdamW: linear warmup, then cosine decay to
``lr * min_lr_ratio``; global-norm clipping)."""

from __future__ import annotations

import ml_collections as mlc


def llama_adamw(c: mlc.ConfigDict, *, lr: float = 3e-4, warmup_steps: int = 2000) -> None:
    """Llama 2 (Touvron et al. 2023, section 2.2; Llama 3 keeps it): AdamW with b1 0.9, b2 0.95,
    eps 1e-5, weight decay 0.1 (not on embeddings), clipping at 1.0, 2000 warmup steps, cosine
    decay to 10% of the peak ``lr`` (3e-4 for 7B and 13B, 1.5e-4 for 34B and 70B)."""
    o = c.optimizer
    o.lr, o.min_lr_ratio, o.schedule, o.warmup_steps = lr, 0.1, "cosine", warmup_steps
    o.b1, o.b2, o.eps = 0.9, 0.95, 1e-5
    o.weight_decay, o.decay_embeddings, o.clip_norm = 0.1, False, 1.0


def nanogpt_adamw(c: mlc.ConfigDict, *, lr: float = 6e-4, b2: float = 0.95, warmup_steps: int = 2000) -> None:
    """nanoGPT's train.py defaults (GPT-2 124M on OpenWebText): AdamW with b1 0.9, ``b2`` 0.95,
    eps 1e-8, weight decay 0.1 on every 2-D weight (embeddings included), clipping at 1.0,
    ``warmup_steps`` 2000, cosine decay to ``lr`` / 10 (``lr`` 6e-4; its
    train_shakespeare_char config: lr 1e-3, b2 0.99, warmup 100)."""
    o = c.optimizer
    o.lr, o.min_lr_ratio, o.schedule, o.warmup_steps = lr, 0.1, "cosine", warmup_steps
    o.b1, o.b2, o.eps = 0.9, b2, 1e-8
    o.weight_decay, o.decay_embeddings, o.clip_norm = 0.1, True, 1.0
