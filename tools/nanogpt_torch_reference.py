"""The PyTorch side of the nanoGPT CPU baseline, for a side-by-side with lmstack.

    pip install -e ".[bench]"   # torch (CPU); not an lmstack dependency
    python tools/nanogpt_torch_reference.py --data ../shared/data/tinyshakespeare/input.txt --seed 0

The same model, data and optimisation as ``experiments/shakespeare_char.py`` (nanoGPT's
train_shakespeare_char config shrunk for CPU, as its README runs it), written in plain
PyTorch: GPT-2 blocks without biases, tied embeddings, N(0, 0.02) init with the residual
projections at 0.02/sqrt(2 * layers), AdamW (decay on 2-D weights only) with warmup and
cosine decay, clipping at 1.0, random windows of the first 90% of the characters. Run on its
own it prints the median ms/iteration and the validation loss over the *whole* last 10%
(lmstack's measure), and nanoGPT's own estimate (the mean over 20 random batches of 12).

``tools/bench_shakespeare.py`` runs this side in a process of its own (:func:`serve`), taking
turns with lmstack on the same token ids: in lmstack's process, beside JAX's thread pools,
torch's OpenMP threads ran 2.5-4x slower on a loaded 2-core machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Hyper:
    """The config (nanoGPT's train_shakespeare_char.py, CPU-shrunk)."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    block: int = 64
    batch: int = 12
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    iters: int = 2000
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    clip: float = 1.0


class Block(nn.Module):
    def __init__(self, h: Hyper):
        super().__init__()
        d = h.d_model
        self.n_heads = h.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, h: Hyper):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, h.d_model), nn.Embedding(h.block, h.d_model)
        self.blocks = nn.ModuleList(Block(h) for _ in range(h.n_layers))
        self.ln_f = nn.LayerNorm(h.d_model, bias=False)
        self.head = nn.Linear(h.d_model, vocab, bias=False)
        self.wte.weight = self.head.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * h.n_layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        """Per-token cross-entropy, shape (B * T,)."""
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none")


def lr_at(it: int, h: Hyper) -> float:
    """nanoGPT's get_lr: linear warmup, cosine to ``min_lr`` at ``iters``, then ``min_lr``."""
    if it < h.warmup:
        return h.lr * (it + 1) / (h.warmup + 1)
    if it > h.iters:
        return h.min_lr
    ratio = (it - h.warmup) / max(h.iters - h.warmup, 1)
    return h.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (h.lr - h.min_lr)


class Trainer:
    """The model, its AdamW and nanoGPT's get_batch over ``train_ids`` (int64 token ids):
    :meth:`train` runs iterations, :meth:`loss_sum` scores given windows."""

    def __init__(self, train_ids: torch.Tensor, vocab: int, h: Hyper, seed: int = 0):
        torch.manual_seed(seed)
        self.h, self.train_ids, self.it = h, train_ids, 0
        self.model = GPT(vocab, h)
        params = list(self.model.parameters())  # the tied embedding once
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": h.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=h.lr, betas=h.betas, eps=h.eps)

    def batch(self, data: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """nanoGPT's get_batch: ``size`` random windows of ``block + 1`` tokens."""
        ix = torch.randint(len(data) - self.h.block, (size,))
        return (torch.stack([data[i:i + self.h.block] for i in ix]),
                torch.stack([data[i + 1:i + 1 + self.h.block] for i in ix]))

    def train(self, n: int) -> list[float]:
        """``n`` optimizer updates; returns each one's seconds."""
        self.model.train()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            for g in self.opt.param_groups:
                g["lr"] = lr_at(self.it, self.h)
            x, y = self.batch(self.train_ids, self.h.batch)
            loss = self.model(x, y).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.h.clip)
            self.opt.step()
            self.it += 1
            times.append(time.perf_counter() - t0)
        return times

    @torch.no_grad()
    def loss_sum(self, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float]:
        """(summed cross-entropy, count) over the targets of (B, T) windows where ``mask`` is true."""
        self.model.eval()
        ce = self.model(inputs, targets)
        if mask is None:
            return float(ce.sum()), float(ce.numel())
        m = mask.reshape(-1).to(ce.dtype)
        return float((ce * m).sum()), float(m.sum())


def serve(conn, hyper: Hyper, train_tokens: np.ndarray, vocab: int, seed: int, threads: int = 0) -> None:
    """A :class:`Trainer` answering a parent process over the pipe ``conn``: it first sends
    ``(torch version, threads)``, then answers each request ``(command, argument)``:
    ``("train", n)`` -> seconds for n updates; ``("loss", [(inputs, targets, mask), ...])``
    (int64 / bool numpy (B, T)) -> (summed cross-entropy, count); ``("load", {name: array})``
    -> None, the model's state_dict replaced; ``("stop", None)`` or a closed pipe ends it.
    A failure is sent back as ``("error", its text)``."""
    import traceback

    try:
        if threads:
            torch.set_num_threads(threads)
        trainer = Trainer(torch.from_numpy(train_tokens.astype(np.int64)), vocab, hyper, seed)
        conn.send((torch.__version__, torch.get_num_threads()))
        while True:
            try:
                command, arg = conn.recv()
            except EOFError:  # the parent is gone
                return
            if command == "stop":
                return
            if command == "train":
                t0 = time.perf_counter()
                trainer.train(arg)
                conn.send(time.perf_counter() - t0)
            elif command == "loss":
                sums = [trainer.loss_sum(*(torch.from_numpy(a) for a in batch)) for batch in arg]
                conn.send((sum(s for s, _ in sums), sum(c for _, c in sums)))
            elif command == "load":
                trainer.model.load_state_dict({k: torch.from_numpy(v) for k, v in arg.items()})
                conn.send(None)
            else:
                raise ValueError(f"unknown command {command!r}")
    except Exception:  # the parent raises it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def whole_split_loss(trainer: Trainer, val: torch.Tensor) -> float:
    """Mean loss over every target of ``val`` once: window k reads tokens [k*block, (k+1)*block]."""
    block = trainer.h.block
    full = (len(val) - 1) // block
    x, y = val[: full * block].view(full, block), val[1: full * block + 1].view(full, block)
    total, count = 0.0, 0.0
    for i in range(0, full, 256):
        s, c = trainer.loss_sum(x[i:i + 256], y[i:i + 256])
        total, count = total + s, count + c
    rest = len(val) - 1 - full * block
    if rest:
        s, c = trainer.loss_sum(val[full * block: full * block + rest][None], val[full * block + 1:][None])
        total, count = total + s, count + c
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/tinyshakespeare/input.txt")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    text = open(args.data, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(ids))
    h = Hyper()
    trainer = Trainer(ids[:n], len(chars), h, args.seed)
    t_start = time.perf_counter()
    times = trainer.train(h.iters)
    wall = time.perf_counter() - t_start
    val = ids[n:]
    sampled = statistics.mean(trainer.loss_sum(*trainer.batch(val, h.batch))[0] / (h.batch * h.block)
                              for _ in range(20))
    whole = whole_split_loss(trainer, val)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seed {args.seed}: "
          f"median {1e3 * statistics.median(times):.1f} ms/iter, wall {wall:.0f} s, "
          f"val loss (whole split) {whole:.4f}, nanoGPT estimate (20 batches) {sampled:.4f}")


if __name__ == "__main__":
    main()
