"""Open weights as a run's parent: a Hugging Face directory or a GGUF file becomes a
:class:`lmstack.init_from.Parent` (run spec + parameter loader), so ``init.from``,
``lmstack import`` and everything downstream treat them like another lmstack run.

Architectures: ``model_type`` bert -> ``model.encoder`` (:mod:`lmstack.interop.hf_bert`);
llama / mistral / qwen2 / gpt2 -> ``model.decoder`` (:mod:`lmstack.interop.hf`); GGUF
``llama`` -> ``model.decoder`` (:mod:`lmstack.interop.gguf`).
"""

from __future__ import annotations

import json
from pathlib import Path

from lmstack import registry
from lmstack.config import ConfigError
from lmstack.data.hf_tokenizer import HFTokenizer
from lmstack.init_from import Parent
from lmstack.runspec import RunSpec


def _spec(section: dict, tokenizer, source: Path, kind: str) -> RunSpec:
    """A spec from an imported model section (completed with the family's defaults)."""
    defaults = registry.lookup("model", section["name"]).config_defaults
    model = {**defaults, **section}
    if tokenizer.vocab_size > model["vocab_size"]:
        raise ConfigError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding only "
                          f"{model['vocab_size']} rows: give the model's own tokenizer")
    return RunSpec(tokenizer=tokenizer, special_ids={}, model=model,
                   lineage={"from": str(source), "kind": kind})


def open_hf(path: Path) -> Parent:
    """A Hugging Face model directory (``config.json`` + safetensors + ``tokenizer.json``)."""
    config_file = path / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{config_file}: not a readable config.json ({e}): pass a Hugging Face model directory")
    if model_type == "bert":
        from lmstack.interop import hf_bert as mod

        section, load = mod.hf_bert_model_section(path), mod.load_hf_bert_params
    else:
        from lmstack.interop import hf as mod

        section, load = mod.hf_model_section(path), mod.load_hf_params
    spec = _spec(section, HFTokenizer.from_dir(path), path, "hf")
    return Parent(spec, lambda abstract_params: load(path, abstract_params))


def open_gguf(path: Path) -> Parent:
    """A GGUF file with its tokenizer and chat template in the metadata."""
    from lmstack.interop import gguf

    parts = gguf.gguf_tokenizer_parts(path)
    tokenizer = HFTokenizer(gguf.build_gguf_tokenizer(parts), bos_id=parts["bos_id"], eos_id=parts["eos_id"],
                            pad_id=parts["pad_id"], add_bos=parts["add_bos"], chat_template=parts["chat_template"])
    spec = _spec(gguf.gguf_model_section(path), tokenizer, path, "gguf")
    return Parent(spec, lambda abstract_params: gguf.load_gguf_params(path, abstract_params))
