"""Contrastive two-tower training for code search: standard-library docstrings -> code.

Launch:  lmstack train code_search_contrastive --workdir runs/codesearch
Data:    (docstring, function source) pairs of the standard library's documented
         functions, split by module so evaluation modules are unseen (~4,000 / ~300 pairs).
Config:  one shared 4-layer encoder (d=128) with a projection head per tower, mean pooling,
         symmetric InfoNCE with a learnable temperature (init 0.07, scale clipped at 100),
         global in-batch negatives (batch 32). ``code_search_contrastive:loss=sigmoid`` for
         SigLIP (learnable temperature and bias initialised at log 10 and -10).
Expect:  held-out recall@10 0.07 after 153 steps (the causal_lm FLOPs of 400 steps), against
         3% by chance (10 / ~300); measured on a 2-core CPU by tools/compare_objectives.py.
"""

import math

from configs.pretrain import stdlib_pretraining, stdlib_smoke


def get_config(arg: str | None = None):
    c, args = stdlib_pretraining(arg, loss="infonce")
    c.model.name = "two_tower"
    c.model.style = "llama"
    c.model.pooling = "mean"
    c.model.share_towers = True
    c.data.source = "stdlib_pairs"
    c.data.val_fraction = 0.1
    c.train.batch_size = 32
    c.objective.name = "contrastive"
    c.objective.loss = args["loss"]
    c.eval.names = ("perplexity", "retrieval")
    c.eval.batches = 0  # every held-out pair: retrieval ranks all of them
    if c.objective.loss == "sigmoid":
        c.model.logit_scale_init = math.log(10.0)
    if args["smoke"]:
        stdlib_smoke(c)  # again: the batch of 32 above replaced the smoke batch
        c.data.max_chars = 0  # pairs come from whole modules
        c.data.val_fraction = 0.05
    return c
