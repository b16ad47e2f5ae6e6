"""BART-style denoising (text infilling + sentence permutation) on an encoder-decoder,
stdlib corpus (~2 min on 2 CPU cores).

Launch:  lmstack train bart_denoising --workdir runs/bart
Config:  2 encoder + 2 decoder layers, d=128, LayerNorm, GELU, rotary positions; 30% of the
         tokens masked in Poisson(3) spans, one mask token per span; target = the window.
"""

from configs.pretrain import stdlib_pretraining


def get_config(arg: str | None = None):
    c, _ = stdlib_pretraining(arg)
    c.model.name = "encoder_decoder"
    c.model.style = "gpt2"
    c.model.positions = "rope"
    c.model.n_encoder_layers = c.model.n_decoder_layers = c.model.n_layers // 2
    c.objective.name = "denoising"
    c.objective.denoise = "both"
    return c
