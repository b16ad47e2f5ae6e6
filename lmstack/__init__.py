"""lmstack: pre-training and post-training of language models in JAX."""

from lmstack import cpu_defaults

__version__ = "0.1.0"

cpu_defaults.apply()  # before anything imports jax: see lmstack/cpu_defaults.py
