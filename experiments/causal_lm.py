"""Causal LM pre-training of a Llama-style decoder on the stdlib corpus, in the shared
setting of the objective comparison (~2 min on 2 CPU cores).

Launch:  lmstack train causal_lm --workdir runs/causal_lm
Expect:  held-out loss 4.36 (perplexity 78) after 400 steps (measured, 2-core CPU); the reference row of
         python tools/compare_objectives.py.
"""

from configs.pretrain import stdlib_pretraining


def get_config(arg: str | None = None):
    c, _ = stdlib_pretraining(arg)
    c.model.name = "decoder"
    c.model.style = "llama"
    c.objective.name = "causal_lm"
    return c
