"""What train, eval and sample share: a run's data, tokenizer, mesh and train-state layout.

A run is identified by its workdir. Training fills it (``config.json``, ``tokenizer/``,
``checkpoints/``, ``metrics.jsonl``, ``tb/``); eval and sample read only from it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
from jax.sharding import Mesh

from lmstack import registry
from lmstack.config import ConfigError
from lmstack.data.pipeline import TokenStream, split_stream, tokenize_documents
from lmstack.data.sources import load_documents
from lmstack.data.tokenizers import Tokenizer, build_tokenizer, load_tokenizer, save_tokenizer
from lmstack.optim import make_optimizer
from lmstack.sharding import MeshError, data_parallel_size, make_mesh
from lmstack.trainstate import abstract_state, model_factory


@dataclasses.dataclass
class RunData:
    tokenizer: Tokenizer
    train: TokenStream
    val: TokenStream


def load_data(cfg: mlc.ConfigDict, workdir: Path) -> RunData:
    """Documents -> tokenizer (the workdir's own if it has one) -> token stream -> split.

    Also resolves ``model.vocab_size`` (0: the tokenizer's size plus the ids the objective
    reserves at the top, e.g. span-corruption sentinels)."""
    documents = load_documents(cfg.data)
    tok_dir = workdir / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(tok_dir)
    else:
        tokenizer = build_tokenizer(cfg.data, documents)
        save_tokenizer(tokenizer, tok_dir)
    resolve_vocab(cfg, tokenizer, tok_dir)
    train, val = split_stream(tokenize_documents(documents, tokenizer), cfg.data.val_fraction, seq_len=cfg.data.seq_len)
    return RunData(tokenizer, train, val)


def resolve_vocab(cfg: mlc.ConfigDict, tokenizer: Tokenizer, where: Path) -> None:
    """The model's vocabulary must cover every id the tokenizer and the objective use."""
    extra = registry.lookup("objective", cfg.objective.name, "objective.name").extra_tokens(cfg)
    needed = tokenizer.vocab_size + extra
    v = cfg.model.vocab_size
    if v and v < needed:
        reserved = f" + {extra} reserved by objective {cfg.objective.name}" if extra else ""
        raise ConfigError(
            f"model.vocab_size={v} is smaller than the tokenizer's {tokenizer.vocab_size} tokens{reserved} ({where}): "
            f"set --config.model.vocab_size=0 to take the tokenizer's size, or use a matching tokenizer"
        )
    with cfg.unlocked():
        cfg.model.vocab_size = v or needed


def check_batch(batch_size: int, mesh: Mesh, key: str, microbatches: int = 1) -> None:
    """Each (micro)batch of ``key`` must split evenly over the data-parallel devices."""
    dp = data_parallel_size(mesh)
    micro = batch_size // microbatches
    if micro % dp == 0:
        return
    need = dp * microbatches
    what = f"{key}={batch_size}" if microbatches == 1 else (
        f"the microbatch size {micro} ({key}={batch_size} / train.microbatches={microbatches})")
    fix = f"set --config.{key} to a multiple of {need} (e.g. {-(-batch_size // need) * need})"
    if microbatches > 1:
        fix += ", lower --config.train.microbatches,"
    raise MeshError(
        f"{what} is not divisible by the data-parallel size {dp} "
        f"(mesh.data={mesh.shape['data']} x mesh.fsdp={mesh.shape['fsdp']}): {fix} "
        f"or change --config.mesh.data / --config.mesh.fsdp"
    )


def build_mesh(cfg: mlc.ConfigDict) -> Mesh:
    mesh = make_mesh(cfg.mesh)
    check_batch(cfg.train.batch_size, mesh, "train.batch_size", cfg.train.microbatches)
    if cfg.eval.batch_size:  # 0 takes train.batch_size, checked above
        check_batch(cfg.eval.batch_size, mesh, "eval.batch_size")
    return mesh


def state_layout(cfg: mlc.ConfigDict, vocab_size: int, mesh: Mesh):
    """(make_model, model config, tx, schedule, graphdef, abstract state, shardings)."""
    make_model, mcfg = model_factory(cfg, vocab_size)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    graphdef, abstract, shardings = abstract_state(make_model, tx, mesh)
    return make_model, mcfg, tx, schedule, graphdef, abstract, shardings


def restore_checkpoint(cfg: mlc.ConfigDict, workdir: Path, step: int | None, mesh: Mesh):
    """(graphdef, state, shardings) of a saved checkpoint (latest, or ``step``), laid out on ``mesh``."""
    from lmstack.checkpoint import Checkpointer

    _, _, _, _, graphdef, abstract, shardings = state_layout(cfg, cfg.model.vocab_size, mesh)
    ckpt = Checkpointer(workdir)
    try:
        state = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    return graphdef, state, shardings


def describe(cfg: mlc.ConfigDict, mcfg: Any, n_params: int, mesh: Mesh, train_tokens: int) -> str:
    """The derived values printed at the start of a run."""
    seq = cfg.data.seq_len
    tokens_per_step = cfg.train.batch_size * seq
    total = tokens_per_step * cfg.train.steps
    fpt = mcfg.flops_per_token(seq)
    mesh_s = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
    lines = [
        f"lmstack {cfg.name}{':' + cfg.arg if cfg.arg else ''}: {jax.device_count()} {jax.default_backend()} "
        f"device(s), mesh {mesh_s}",
        f"  parameters       {n_params:,}",
        f"  tokens per step  {tokens_per_step:,} (batch {cfg.train.batch_size} x seq {seq}"
        f"{f', {cfg.train.microbatches} microbatches' if cfg.train.microbatches > 1 else ''})",
        f"  FLOPs per token  {fpt:,.0f} (train, 6N + attention)",
        f"  total tokens     {total:,} over {cfg.train.steps:,} steps "
        f"({total / max(train_tokens, 1):.2f} epochs of {train_tokens:,} training tokens)",
        f"  total FLOPs      {fpt * total:.3g}",
    ]
    return "\n".join(lines)
