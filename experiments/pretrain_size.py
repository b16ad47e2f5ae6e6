"""Pre-train a published architecture from scratch (SmolLM2, Llama 3 / 3.2, GPT-2, T5, BERT
shapes from configs.models) with the Llama AdamW recipe, laid out for a chosen machine.

Launch:  lmstack train pretrain_size:size=smollm2-135m --workdir runs/smollm2
Check:   lmstack compile pretrain_size:size=llama3-8b,mesh=v5p-128 --topology v5p-128
         compiles the train step for a TPU pod on this machine and prints per-chip memory
         and FLOPs (see README, "Compiling for a TPU pod").
Config:  ``size`` one of configs.models.SIZES; ``mesh`` one of configs.meshes.MESHES (default:
         data parallel over the local devices); ``batch`` global sequences of ``seq_len``
         tokens; bfloat16 compute with full rematerialisation. The objective follows the
         family: causal LM (decoders), masked LM (encoders), span corruption (encoder-decoders).
         Data: the stdlib corpus (a stand-in: bring your own with --config.data.*).
"""

from configs import meshes, models, optimizers, smoke
from lmstack.config import ConfigError, parse_arg
from lmstack.configs.base import base_config

OBJECTIVES = {"decoder": "causal_lm", "encoder": "mlm", "encoder_decoder": "span_corruption"}


def get_config(arg: str | None = None):
    args = parse_arg(arg, allowed={"size": "smollm2-135m", "mesh": "", "batch": 256, "seq_len": 2048,
                                   "smoke": False})
    for key, table in (("size", models.SIZES), ("mesh", meshes.MESHES)):
        if args[key] and args[key] not in table:
            raise ConfigError(f"{key}={args[key]!r} is not known: choose one of {', '.join(table)}")
    c = base_config()
    models.SIZES[args["size"]](c)
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.objective.name = OBJECTIVES[c.model.name]
    c.data.source = "stdlib"
    c.data.seq_len = args["seq_len"]
    c.data.tokenizer.kind = "sentencepiece"
    c.train.batch_size = args["batch"]
    c.train.steps = 10_000
    c.train.log_every = 10
    optimizers.llama_adamw(c)
    c.checkpoint.every = 1000
    c.eval.every = 1000
    if args["mesh"]:
        meshes.MESHES[args["mesh"]](c)
    if args["smoke"]:
        # the family's options stay; sizes shrink and the vocabulary is the tokenizer's
        sizes = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=0, head_dim=0, d_ff=0, vocab_size=0,
                     max_seq_len=0, dtype="float32", remat="none")
        if c.model.name == "encoder_decoder":
            sizes.update(n_encoder_layers=0, n_decoder_layers=0)
        smoke.shrink(c, model=sizes, chars=200_000, vocab_size=384, new_tokens=4)
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    return c
