"""``lmstack import`` and ``lmstack export``: open weights in and out of lmstack workdirs.

``import_workdir(SOURCE, W)`` makes a workdir whose weights are SOURCE (a Hugging Face
directory, a GGUF file or another run): it writes ``config.json`` (``init.from=SOURCE``),
``run_spec.json`` and ``tokenizer/``, no checkpoint, so ``lmstack chat/sample/eval/export``
read the weights from SOURCE and ``lmstack train NAME --config.init.from=W`` starts from them.

``export_workdir(W, fmt, OUT)`` writes a run's parameters (latest checkpoint, or ``step``) as
a Hugging Face directory (``model.safetensors`` + ``config.json`` + tokenizer files) or a
GGUF file (F32 / F16 / Q8_0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
from flax import nnx

from lmstack.config import ConfigError, compose, save_config
from lmstack.configs.base import base_config
from lmstack.data.tokenizers import save_tokenizer
from lmstack.init_from import open_parent, parse_init_from
from lmstack.peft.lora import merge_lora

FORMATS = ("hf", "gguf", "peft")


def import_workdir(source: str, workdir: str | Path) -> Path:
    """A workdir whose weights come from ``source`` (see the module docstring)."""
    workdir = Path(workdir)
    if (workdir / "config.json").exists():
        raise ConfigError(f"--workdir {str(workdir)!r} already holds a run: pick a new directory")
    src = parse_init_from(source)
    if src.kind == "scratch":
        raise ConfigError("lmstack import: give a Hugging Face directory, a .gguf file or a run's workdir")
    parent = open_parent(src)
    raw = base_config()
    raw.model = mlc.ConfigDict(parent.spec.model)
    raw.init["from"] = str(src)
    raw.mesh.data = 1
    # evaluation on this workdir (lmstack eval) runs batches of 8 x 512 tokens at most
    raw.data.seq_len = min(int(parent.spec.model.get("max_seq_len") or 512), 512)
    raw.train.batch_size = 8
    cfg = compose(raw, str(src))
    workdir.mkdir(parents=True, exist_ok=True)
    parent.spec.lineage["imported"] = True
    parent.spec.save(workdir)
    save_config(cfg, workdir)
    return workdir


def gguf_tokenizer_parts_of(tokenizer: Any) -> dict[str, Any] | None:
    """GGUF tokenizer metadata (:func:`lmstack.interop.gguf.gguf_tokenizer_parts`'s keys) for a
    byte-level BPE ``hf`` tokenizer; None for tokenizers GGUF readers would not rebuild."""
    if getattr(tokenizer, "kind", "") != "hf":
        return None
    body = json.loads(tokenizer.to_json())
    model = body.get("model", {})
    if model.get("type") != "BPE":
        return None
    vocab: dict[str, int] = dict(model["vocab"])
    for added in body.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = {a["id"] for a in body.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    digits = "Digits" in json.dumps(body.get("pre_tokenizer"))
    return {"model": "gpt2", "pre": "smollm" if digits else "gpt2", "tokens": tokens, "merges": merges,
            "token_types": [3 if i in special else 1 for i in range(len(tokens))],  # llama.cpp CONTROL / NORMAL
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id, "unk_id": None,
            "add_bos": tokenizer.add_bos, "chat_template": tokenizer.chat_template}


def export_workdir(workdir: str | Path, fmt: str, out: str | Path, *, qtype: str = "F32",
                   step: int | None = None) -> Path:
    """Write the run in ``workdir`` as ``fmt`` (hf | gguf | peft) to ``out``; returns ``out``.
    A LoRA run's adapters are merged into the base weights for hf and gguf (PEFT's
    ``merge_and_unload``); ``peft`` writes the adapters alone. An objective's own heads (PPO's
    value head) are left out: the export is the policy, as TRL saves it."""
    from lmstack.run import Run
    from lmstack.sharding import make_mesh

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")
    run = Run.open(workdir, mesh=make_mesh({"data": 1, "fsdp": 1, "tensor": 1}))
    model = run.model(run.restore(step))
    out = Path(out)
    if fmt == "peft":
        from lmstack.interop.peft_export import export_peft
        from lmstack.peft.lora import LoraSpec

        if run.cfg.peft.name != "lora":
            raise ConfigError(f"--format peft writes LoRA adapters; {workdir} was trained with "
                              f"peft.name={run.cfg.peft.name!r}: export it with --format hf or gguf")
        return export_peft(model, run.model_cfg, LoraSpec.from_section(run.cfg.peft), out)
    merge_lora(model)
    # the policy alone: not an objective's own heads (PPO's value head, its trainable_types)
    heads = tuple(getattr(run.objective, "trainable_types", ()))
    params = jax.device_get(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam), nnx.Not(heads))))
    if fmt == "gguf":
        from lmstack.interop.gguf import export_gguf

        export_gguf(params, run.model_cfg, out, qtype=qtype, tokenizer_parts=gguf_tokenizer_parts_of(run.spec.tokenizer))
        return out
    from lmstack.interop.hf import export_hf

    export_hf(params, run.model_cfg, out)
    if run.spec.tokenizer.kind == "hf":
        save_tokenizer(run.spec.tokenizer, out)  # tokenizer.json + tokenizer_config.json, as transformers reads them
    else:  # lmstack's own files, kept apart so nothing mistakes them for a Hugging Face tokenizer.json
        save_tokenizer(run.spec.tokenizer, out / "lmstack_tokenizer")
        print(f"lmstack: note: the run's {run.spec.tokenizer.kind} tokenizer has no Hugging Face tokenizer.json form; "
              f"it is saved in lmstack's format under {out / 'lmstack_tokenizer'}", file=sys.stderr)
    return out
