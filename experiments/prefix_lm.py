"""Prefix LM pre-training of a Llama-style decoder on the stdlib corpus (~2 min on 2 CPU cores).

Launch:  lmstack train prefix_lm --workdir runs/prefix_lm
Expect:  held-out loss on the suffixes 4.52 after 400 steps (measured, 2-core CPU); compare with the other
         objectives at the same FLOPs: python tools/compare_objectives.py.
"""

from configs.pretrain import stdlib_pretraining


def get_config(arg: str | None = None):
    c, _ = stdlib_pretraining(arg)
    c.model.name = "decoder"
    c.model.style = "llama"
    c.objective.name = "prefix_lm"
    return c
