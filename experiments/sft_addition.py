"""Supervised fine-tuning on the synthetic addition task: the starting point of grpo_addition.

Launch:  lmstack train sft_addition --workdir runs/sft_addition
Config:  2-digit addition ("12+45=" -> "57", lmstack.rl.tasks), 4,000 training problems
         and 400 held-out ones (never among the training pairs), written once as
         prompt_completion JSONL to the lmstack cache ($LMSTACK_CACHE/tasks/); each rendered as prompt, answer and a newline (the stop
         byte of the GRPO rollouts), loss on the answer and its newline only; a byte-level
         Llama-style decoder from scratch (4 layers, d=128), best-fit packed rows of 64
         bytes, 32 rows a step, AdamW lr 3e-3, 300 steps.
Expect:  measured: held-out loss 0.632 per answer byte, byte accuracy 0.749, exact-match
         accuracy of greedy answers 0.215 (tools/rl_table.py); 300 steps in ~11 minutes on
         a shared 2-core CPU (load average 12-17; ~2.2 s a step, ~0.4 s of CPU).
"""

from configs.addition import TEMPLATE, addition_data, addition_model
from lmstack.config import parse_arg
from lmstack.configs.base import base_config


def get_config(arg: str | None = None):
    args = parse_arg(arg, allowed={"smoke": False})
    smoke = args["smoke"]
    c = base_config()
    addition_model(c, smoke=smoke)
    addition_data(c, digits=2, n_train=200 if smoke else 4000, n_test=40 if smoke else 400)
    c.data.seq_len = 64
    c.objective.name = "sft"
    c.objective.chat_template = TEMPLATE
    c.objective.loss_on = "assistant"
    c.objective.packing = "best_fit"
    c.train.batch_size = 32
    c.train.steps = 300
    c.train.log_every = 50
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.b2 = 0.99
    c.optimizer.weight_decay = 0.0
    c.checkpoint.every = 300
    c.eval.every = 100
    c.eval.batches = 0  # every held-out problem
    c.sample.prompt = "12+45="
    c.sample.max_new_tokens = 6
    c.sample.temperature = 0.0
    if smoke:
        c.train.batch_size = 8
        c.train.steps = 4
        c.train.log_every = 2
        c.optimizer.warmup_steps = 1
        c.checkpoint.every = c.eval.every = 2
        c.eval.batches = 1
    return c
