"""Supervised fine-tuning on Alpaca conversations: ChatML, loss on the replies, packed rows.

Launch:  lmstack train sft_chat --workdir runs/sft_chat \
             --config.data.path=../shared/data/instruct/alpaca_en_demo.json
Config:  a byte-level 4-layer d=128 decoder trained from scratch on the 999 Alpaca demo
         conversations (10% held out), each rendered with ChatML; loss on the assistant
         replies and their <|im_end|> only (objective.loss_on=assistant); best-fit packing
         into rows of 513 bytes; AdamW lr 2e-3, 300 steps of 16 rows.
Expect:  the printout's data lines (measured): train 899 conversations, 364,704 tokens, 243,061
         carrying loss, 491 cut to 513 bytes (393,896 bytes dropped: most replies are longer
         than 512 bytes); val 100 conversations. Training loss at step 1 is 5.53 (ln 259 =
         5.56). Measured with --config.train.steps=40 --config.optimizer.warmup_steps=5
         --config.eval.batches=4: held-out loss on reply bytes 2.80 (perplexity 16.4 per
         byte) at step 40, in ~15 minutes on 2 heavily shared CPU cores (~9 s a step at the
         end). The 300-step default has not been run to the end.
"""

from lmstack.config import parse_arg
from lmstack.configs.base import base_config


def get_config(arg: str | None = None):
    args = parse_arg(arg, allowed={"smoke": False})
    c = base_config()
    c.model.d_model = 128
    c.model.n_layers = 4
    c.model.n_heads = 4
    c.model.scan_unroll = 4
    c.data.source = "alpaca"
    c.data.seq_len = 512
    c.data.val_fraction = 0.1
    c.data.tokenizer.kind = "byte"
    c.objective.name = "sft"
    c.objective.chat_template = "chatml"
    c.objective.loss_on = "assistant"
    c.objective.packing = "best_fit"
    c.train.batch_size = 16
    c.train.steps = 300
    c.train.log_every = 20
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 30
    c.optimizer.b2 = 0.99
    c.checkpoint.every = 300
    c.eval.every = 100
    c.eval.batches = 0  # every held-out conversation
    c.sample.prompt = "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"
    c.sample.max_new_tokens = 32
    if args["smoke"]:
        c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.scan_unroll = 32, 2, 2, 2
        c.data.seq_len = 128
        c.train.batch_size = 8
        c.train.steps = 4
        c.train.log_every = 2
        c.optimizer.warmup_steps = 1
        c.checkpoint.every = 2
        c.eval.every = 2
        c.eval.batches = 1
        c.sample.max_new_tokens = 4
    return c
