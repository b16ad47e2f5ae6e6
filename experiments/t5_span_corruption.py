"""T5-style span corruption on an encoder-decoder (relative position buckets, RMSNorm,
shared embeddings) on the stdlib corpus (~2 min on 2 CPU cores).

Launch:  lmstack train t5_span_corruption --workdir runs/t5
Config:  2 encoder + 2 decoder layers, d=128; noise density 0.15, mean span 3, 100 sentinels
         at the top of the vocabulary; inputs of 128 tokens from raw windows of 142.
Expect:  held-out target loss 4.55 after 751 steps (the causal_lm FLOPs of 400 steps; measured
         on a 2-core CPU by tools/compare_objectives.py).
"""

from configs.pretrain import stdlib_pretraining


def get_config(arg: str | None = None):
    c, args = stdlib_pretraining(arg)
    c.model.name = "encoder_decoder"
    c.model.style = "llama"
    c.model.positions = "relative"
    c.model.n_encoder_layers = c.model.n_decoder_layers = c.model.n_layers // 2
    c.objective.name = "span_corruption"
    c.objective.num_sentinels = 16 if args["smoke"] else 100
    return c
