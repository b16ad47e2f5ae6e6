"""UL2 mixture of denoisers (R, X, S with mode tokens) on an encoder-decoder, stdlib corpus
(~2 min on 2 CPU cores).

Launch:  lmstack train ul2 --workdir runs/ul2
Config:  as t5_span_corruption, with the R / X-dense / X-long / S denoisers mixed 0.4/0.2/0.2/0.2.
"""

from configs.pretrain import stdlib_pretraining


def get_config(arg: str | None = None):
    c, args = stdlib_pretraining(arg)
    c.model.name = "encoder_decoder"
    c.model.style = "llama"
    c.model.positions = "relative"
    c.model.n_encoder_layers = c.model.n_decoder_layers = c.model.n_layers // 2
    c.objective.name = "ul2"
    c.objective.num_sentinels = 40 if args["smoke"] else 100
    return c
