"""BERT-style masked LM on an encoder (post-LN, GELU, learned positions, token types,
MLM transform head, pooler) on the stdlib corpus (~2 min on 2 CPU cores).

Launch:  lmstack train bert_mlm --workdir runs/bert
Config:  4 layers, d=128; 15% of tokens selected, 80/10/10 mask/random/keep.
"""

from configs.pretrain import stdlib_pretraining


def get_config(arg: str | None = None):
    c, _ = stdlib_pretraining(arg)
    c.model.name = "encoder"
    c.model.style = "gpt2"
    c.model.positions = "learned"
    c.model.norm_position = "post"
    c.model.type_vocab_size = 2
    c.model.mlm_transform = True
    c.model.pooler = True
    c.model.pooling = "mean"
    c.model.use_bias = True
    c.optimizer.lr = 1e-3  # post-LN trains less stably at the decoders' 2e-3
    c.objective.name = "mlm"
    return c
