"""Small builders shared by tests: a tiny config and synthetic packed batches."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from lmstack.configs.base import base_config


def tiny_config(style: str = "llama", **train):
    """A 2-layer, d=64 model whose every dimension divides the 8-device meshes we test."""
    c = base_config()
    c.model.style = style
    c.model.vocab_size = 256
    c.model.d_model = 64
    c.model.n_layers = 2
    c.model.n_heads = 8
    c.model.n_kv_heads = 4 if style == "llama" else 0
    c.model.d_ff = 128
    c.data.seq_len = 16
    c.train.batch_size = 8
    c.optimizer.warmup_steps = 2
    c.optimizer.lr = 3e-3
    c.train.steps = 10
    c.train.update(train)
    return c


def packed_batch(rng: np.random.Generator, batch: int, seq_len: int, vocab: int = 256) -> dict[str, np.ndarray]:
    """Random tokens in rows of 2-3 documents, with segment ids and in-document positions."""
    n = seq_len + 1
    seg = np.zeros((batch, n), np.int32)
    pos = np.zeros((batch, n), np.int32)
    for r in range(batch):
        cuts = sorted(rng.choice(np.arange(2, n - 1), size=rng.integers(1, 3), replace=False))
        bounds = [0, *cuts, n]
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg[r, a:b] = i + 1
            pos[r, a:b] = np.arange(b - a)
    tokens = rng.integers(0, vocab, size=(batch, n)).astype(np.int32)
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}


_WORDS = (
    "the king queen lord lady night day love death sword crown heart blood fair sweet "
    "noble gentle speak hear come go stay fly weep laugh sleep dream honour grace"
).split()
_NAMES = ("ROMEO", "JULIET", "HAMLET", "OPHELIA", "LEAR", "CORDELIA")


def run_steps(cfg, mesh_shape, batches, flat_allreduce: bool = False):
    """``batches`` trained with ``cfg``'s model, optimizer and objective from its init on a
    ``(data, fsdp, tensor)`` mesh by the compiled train step: (losses, final state, step)."""
    import jax

    from lmstack import registry
    from lmstack.config import compose
    from lmstack.optim import make_optimizer
    from lmstack.sharding import batch_sharding, make_mesh
    from lmstack.step import compile_train_step
    from lmstack.trainstate import init_state, model_factory

    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    make_model, _ = model_factory(cfg, vocab_size=256)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    graphdef, state, shardings = init_state(make_model, tx, mesh)
    objective = registry.lookup("objective", cfg.objective.name)(compose(cfg))
    bsh = batch_sharding(mesh)
    step = compile_train_step(graphdef, tx, schedule, objective, cfg.train.microbatches, shardings, bsh,
                              flat_allreduce=flat_allreduce)
    losses = []
    with jax.set_mesh(mesh):
        for i, b in enumerate(batches):
            state, metrics = step(state, jax.device_put(b, bsh), jax.random.key(i))
            losses.append(float(metrics["loss"]))
    return losses, state, step


def corpus_text(n_chars: int = 8000, seed: int = 0) -> str:
    """Deterministic play-like text (names, words, punctuation) of at least ``n_chars`` characters."""
    rng = np.random.default_rng(seed)
    lines: list[str] = []
    size = 0
    while size < n_chars:
        if rng.random() < 0.2:
            line = f"{_NAMES[rng.integers(len(_NAMES))]}:"
        else:
            words = [_WORDS[i] for i in rng.integers(len(_WORDS), size=rng.integers(4, 10))]
            line = " ".join(words).capitalize() + ".,;!?"[rng.integers(5)]
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines) + "\n"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character table (openai/gpt-2 encoder.py), as byte-level BPE vocabularies spell bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_tb_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from every TensorBoard event file under ``tb_dir`` (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    files = sorted(tb_dir.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {tb_dir}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            record = data[pos + 12 : pos + 12 + length]  # u64 length, u32 crc, data, u32 crc
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


TEXT = "The quick brown fox jumps over the lazy dog. " * 200


def text_config(data, **train_keys):
    """A tiny byte-level causal LM over the text file ``data``: 2 steps, a checkpoint every
    step, one mesh device (for runs that start from each other)."""
    cfg = tiny_config(**{"steps": 2, "log_every": 1, "progress": False, **train_keys})
    cfg.model.vocab_size = 0
    cfg.data.source, cfg.data.path, cfg.data.tokenizer.kind = "text", str(data), "byte"
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
    cfg.checkpoint.every, cfg.checkpoint.async_save, cfg.eval.every, cfg.eval.batches = 1, False, 0, 1
    cfg.sample.max_new_tokens = 2
    return cfg
