"""Continued pre-training on a new corpus, and what it costs the old one: the quickstart model
(Python's standard library) trained on further on Tiny Shakespeare, with or without a
mitigation of forgetting.

Launch:  lmstack train quickstart --workdir runs/quickstart            # the parent, once
         lmstack train continued_pretraining:method=replay --workdir runs/cpt_replay \
             --config.data.path=../shared/data/tinyshakespeare/input.txt
Methods: full (every weight, lr 1e-3), lora (r 8 alpha 16 on every block projection, the
         base frozen, lr 1e-3: "LoRA learns less and forgets less", Biderman et al. 2024), replay (25% of each batch from the parent's stdlib
         windows), l2sp (alpha 1e-3 towards the parent's weights), ewc (lambda 100, Fisher of
         16 x 8 stdlib windows), low_lr (lr 1e-4, 10x lower). ``parent=WORKDIR`` picks another parent.
Reports: eval/loss and eval/perplexity on Shakespeare, eval/forgetting/parent_ppl_before,
         parent_ppl_now and ratio on the parent's held-out stdlib text. sweep() runs the six
         methods: lmstack sweep continued_pretraining --config.data.path=... then
         lmstack report runs/continued_pretraining. The full-size runs are not measured yet.
Measured: python tools/forgetting_table.py (a smoke-sized parent, 200 stdlib steps; 60 Shakespeare
         steps per method; 2-core CPU, 12-21 s a run): parent perplexity 34.8 -> 81.1 (full),
         48.6 (lora), 38.0 (replay), 80.3 (l2sp), 74.1 (ewc), 39.5 (low_lr); Shakespeare
         perplexity 41.1, 66.1, 45.3, 41.3, 41.6, 66.5 (README: Continued pre-training and forgetting).
Smoke:   ``smoke=True`` starts from scratch (no parent run needed) with the stdlib as the
         "parent's" corpus (init.data_source) and runs in seconds; with ``parent=WORKDIR`` it
         starts from that run instead (which must have quickstart:smoke=True's architecture).
"""

from lmstack.config import ConfigError, parse_arg
from lmstack.configs.base import base_config

METHODS = ("full", "lora", "replay", "l2sp", "ewc", "low_lr")


def sweep():
    return [{"optimizer.lr": 1e-3}, {"peft.name": "lora", "peft.r": 8, "peft.target_modules": "all-linear"},
            {"replay.fraction": 0.25},
            {"regularization.name": "l2sp", "regularization.alpha": 1e-3},
            {"regularization.name": "ewc", "regularization.ewc_lambda": 100.0}, {"optimizer.lr": 1e-4}]


def get_config(arg: str | None = None):
    args = parse_arg(arg, allowed={"smoke": False, "method": "full", "parent": ""})
    if args["method"] not in METHODS:
        raise ConfigError(f"method={args['method']!r}: must be one of {', '.join(METHODS)}")
    c = base_config()
    c.init["from"] = args["parent"] or "runs/quickstart"
    c.data.source = "text"  # --config.data.path=../shared/data/tinyshakespeare/input.txt
    c.data.seq_len = 256
    c.train.batch_size = 16
    c.train.steps = 300
    c.train.log_every = 10
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 30
    c.optimizer.b2 = 0.99
    c.checkpoint.every = 100
    c.eval.every = 100
    c.eval.batches = 8
    c.eval.names = ("perplexity", "forgetting")
    c.sample.prompt = "ROMEO:"
    if args["method"] == "lora":
        c.peft.name = "lora"
        c.peft.r = 8
        c.peft.target_modules = "all-linear"
    elif args["method"] == "replay":
        c.replay.fraction = 0.25
    elif args["method"] == "l2sp":
        c.regularization.name = "l2sp"
        c.regularization.alpha = 1e-3
    elif args["method"] == "ewc":
        c.regularization.name = "ewc"
        c.regularization.ewc_lambda = 100.0
    elif args["method"] == "low_lr":
        c.optimizer.lr = 1e-4
    if args["smoke"]:
        # quickstart:smoke=True's architecture, so such a run can be the parent
        c.model.style, c.model.tie_embeddings = "llama", True
        c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 64, 2, 4, 2
        if not args["parent"]:
            c.init["from"] = "scratch"
            c.init.data_source = "stdlib"
            c.data.tokenizer.kind = "byte"
        c.data.max_chars = 300_000
        c.data.seq_len = 64
        c.train.batch_size = 8
        c.train.steps = 6
        c.train.log_every = 2
        c.optimizer.warmup_steps = 2
        c.checkpoint.every = 3
        c.eval.every = 3
        c.eval.batches = 2
        c.sample.max_new_tokens = 8
        if args["method"] == "ewc":
            c.regularization.fisher_batches = 2
    return c
