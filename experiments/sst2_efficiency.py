"""SST-2 data efficiency: all-MiniLM-L6-v2 fine-tuned on n labelled sentences, from its
pre-trained weights or from scratch (the same architecture and tokenizer, randomly initialised),
on the same budget of optimizer steps; scored on SST-2 dev.

Launch:  lmstack train sst2_efficiency:init=pretrained,n=100 --workdir runs/sst2eff/pre-100
         lmstack train sst2_efficiency:init=scratch,n=1000,seed=1 --workdir runs/sst2eff/scr-1000-s1
         the whole grid, its table and plot: python tools/sst2_efficiency_table.py --workdir runs/sst2eff
Args:    init=pretrained|scratch; n: labelled examples (data.max_records: the first n of train.tsv,
         whose order is already shuffled: 47% positive in the first 32, 55% in the first 8,000
         and in the whole file); seed: train.seed and data.seed (initialisation, dropout, batch
         order; the tool also draws a different subset per seed > 0); lr: 0 takes the init's
         default, 1e-4 pre-trained (BERT fine-tuning) and 5e-4 scratch.
Data:    ../shared/data/sst2 (see sst2_classify): train.tsv for the n examples, dev.tsv (872) held out.
Config:  configs.models.minilm_l6 without the pooler (as sentence-transformers runs it), the
         classifier on the mean of the last hidden states, dropout 0.1, the MiniLM WordPiece
         tokenizer, inputs framed ``[CLS] text [SEP]`` in 48 tokens (24 of the 872 dev sentences and
         0.6% of the training phrases are cut); AdamW (b2 0.999, weight decay 0.01, warmup 3 steps,
         cosine to 0.1x), batch 16, 32 steps for every n and both inits (512 examples seen: 16
         epochs of 32, 0.06 of 8,000), sized so the 12-run grid fits 45 minutes on a shared 2-core CPU.
Expect:  dev accuracy, pre-trained: 0.674 at n=32, 0.747 / 0.728 (seeds 0 / 1) at n=100, 0.773 at
         n=8,000; scratch: 0.50-0.57 at every n (always answering positive scores 0.509), so on this
         budget scratch does not reach pre-trained@100 by n=8,000 (> 80x, a lower bound); with 10x
         the steps (--config.train.steps=320) scratch at n=8,000 reaches 0.762. One run:
         180-290 s on a 2-core AMD EPYC at load average 8-10 (32 steps at ~3.7 s, ~60 s start and
         compile, ~50 s evaluation). Table and plot: README "Measured: data efficiency on SST-2".
"""

from configs.models import minilm_l6
from configs.open_weights import minilm_dir
from lmstack.config import ConfigError, parse_arg
from lmstack.configs.base import base_config

INITS = ("pretrained", "scratch")
DEFAULT_LR = {"pretrained": 1e-4, "scratch": 5e-4}
STEPS, BATCH, SEQ_LEN = 32, 16, 48


def get_config(arg: str | None = None):
    args = parse_arg(arg, allowed={"init": "pretrained", "n": 100, "seed": 0, "lr": 0.0, "smoke": False})
    if args["init"] not in INITS:
        raise ConfigError(f"sst2_efficiency: init={args['init']!r} is not one of {', '.join(INITS)}: "
                          f"write sst2_efficiency:init=pretrained or init=scratch")
    if args["n"] < BATCH and not args["smoke"]:
        raise ConfigError(f"sst2_efficiency: n={args['n']} is fewer than one batch of {BATCH}: pass n >= {BATCH}")
    c = base_config()
    model_dir = minilm_dir(missing_ok=True)
    minilm_l6(c)
    c.model.update(pooler=False, pooling="mean", classifier_pooling="mean", num_labels=2, dropout=0.1,
                   scan_unroll=6)  # fully unrolled: XLA:CPU's backward pass runs ~2x faster
    if args["init"] == "pretrained":
        c.init["from"] = model_dir  # the same architecture and tokenizer, with its weights
    else:
        c.data.tokenizer.kind = "hf"
        c.data.tokenizer.path = model_dir
    c.data.source = "classification"
    c.data.path = "../shared/data/sst2/train.tsv"
    c.data.val_path = "../shared/data/sst2/dev.tsv"
    c.data.field = "1"  # the text column (train.tsv calls it sentence, dev.tsv content)
    c.data.label_field = "label"
    c.data.seq_len = SEQ_LEN
    c.data.max_records = args["n"]
    c.data.seed = args["seed"]
    c.objective.name = "classify"
    c.objective.labels = "0,1"
    c.train.steps = STEPS
    c.train.batch_size = BATCH
    c.train.seed = args["seed"]
    c.train.log_every = 25
    c.optimizer.lr = args["lr"] or DEFAULT_LR[args["init"]]
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 0.01
    c.optimizer.warmup_steps = max(STEPS // 10, 1)
    c.checkpoint.every = STEPS  # the final one only
    c.checkpoint.keep = 1
    c.eval.every = 0  # once, at the end
    c.eval.batches = 0  # the whole dev set
    c.eval.batch_size = 64
    c.eval.names = ("classification",)
    c.log.tensorboard = False
    if args["smoke"]:
        c.data.max_records = min(args["n"], 32)
        c.train.steps = 4
        c.train.batch_size = 8
        c.train.log_every = 2
        c.optimizer.warmup_steps = 1
        c.checkpoint.every = 4
        c.eval.batches = 2
        c.eval.batch_size = 8
        c.data.seq_len = 32
    return c
