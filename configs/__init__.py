"""Reusable config pieces that experiments compose instead of copying.

- :mod:`configs.models`: published model sizes (SmolLM2, Llama 3 / 3.2, GPT-2, T5, BERT),
  each a function that sets a config's ``model`` section.
- :mod:`configs.optimizers`: AdamW recipes as the Llama and nanoGPT papers / repos train.
- :mod:`configs.meshes`: ``mesh`` layouts for common machines (one GPU, 8 and 2x8 H100,
  TPU v5e-256, v5p-128).
- :mod:`configs.smoke`: the smoke shrink every experiment applies for ``smoke=True``.
- :mod:`configs.pretrain`: the shared stdlib pre-training setting of the objective comparison.
- :mod:`configs.open_weights`: open-weight starting points installed packages ship (``smollm2_gguf()``,
  ``smollm2_instruct(c)``) and their from-scratch smoke stand-in.

Import them from any experiment file (the repo's ``experiments/``, ``./experiments`` or
``$LMSTACK_EXPERIMENTS``) as ``from configs import models, smoke``; ``pip install -e .``
installs this package beside ``lmstack``. The config schema itself stays in
``lmstack/configs/base.py``.
"""
