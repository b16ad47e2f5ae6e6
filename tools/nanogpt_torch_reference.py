"""The PyTorch side of the nanoGPT CPU baseline, for a side-by-side with lmstack.

    pip install torch==2.13.0   # not an lmstack dependency
    python tools/nanogpt_torch_reference.py --data ../shared/data/tinyshakespeare/input.txt --seed 0

The same model, data and optimisation as ``experiments/shakespeare_char.py`` (nanoGPT's
train_shakespeare_char config shrunk for CPU, as its README runs it), written in plain
PyTorch: GPT-2 blocks without biases, tied embeddings, N(0, 0.02) init with the residual
projections at 0.02/sqrt(2 * layers), AdamW (decay on 2-D weights only) with warmup and
cosine decay, clipping at 1.0, random windows of the first 90% of the characters. It prints
the median ms/iteration and the validation loss over the *whole* last 10% (lmstack's
measure), and nanoGPT's own estimate (the mean over 20 random batches of 12).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

D, LAYERS, HEADS, BLOCK, BATCH = 128, 4, 4, 64, 12
LR, MIN_LR, WARMUP, ITERS, WD, BETAS, CLIP = 1e-3, 1e-4, 100, 2000, 0.1, (0.9, 0.99), 1.0


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D, bias=False), nn.LayerNorm(D, bias=False)
        self.qkv, self.proj = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D, bias=False)
        self.fc, self.out = nn.Linear(D, 4 * D, bias=False), nn.Linear(4 * D, D, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, HEADS, D // HEADS).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(D, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, D), nn.Embedding(BLOCK, D)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(D, bias=False)
        self.head = nn.Linear(D, vocab, bias=False)
        self.wte.weight = self.head.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * LAYERS) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none")


def lr_at(it: int) -> float:
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    ratio = (it - WARMUP) / (ITERS - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def whole_split_loss(model: GPT, val: torch.Tensor) -> float:
    """Mean loss over every target of ``val`` once: window k reads tokens [k*BLOCK, (k+1)*BLOCK]."""
    full = (len(val) - 1) // BLOCK
    x, y = val[: full * BLOCK].view(full, BLOCK), val[1: full * BLOCK + 1].view(full, BLOCK)
    total = sum(model(x[i:i + 256], y[i:i + 256]).sum().item() for i in range(0, full, 256))
    count = y.numel()
    rest = len(val) - 1 - full * BLOCK
    if rest:
        total += model(val[full * BLOCK: full * BLOCK + rest][None], val[full * BLOCK + 1:][None]).sum().item()
        count += rest
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/tinyshakespeare/input.txt")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    text = open(args.data, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(ids))
    train, val = ids[:n], ids[n:]

    def batch(data, size):
        ix = torch.randint(len(data) - BLOCK, (size,))
        return torch.stack([data[i:i + BLOCK] for i in ix]), torch.stack([data[i + 1:i + 1 + BLOCK] for i in ix])

    model = GPT(len(chars))
    params = list(model.parameters())  # the tied embedding once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WD},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS)
    times = []
    t_start = time.perf_counter()
    for it in range(ITERS):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        x, y = batch(train, BATCH)
        loss = model(x, y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_start
    model.eval()
    with torch.no_grad():
        sampled = statistics.mean(model(*batch(val, BATCH)).mean().item() for _ in range(20))
        whole = whole_split_loss(model, val)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seed {args.seed}: "
          f"median {1e3 * statistics.median(times):.1f} ms/iter, wall {wall:.0f} s, "
          f"val loss (whole split) {whole:.4f}, nanoGPT estimate (20 batches) {sampled:.4f}")


if __name__ == "__main__":
    main()
