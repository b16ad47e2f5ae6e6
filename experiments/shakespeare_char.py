"""nanoGPT's CPU baseline: a character-level GPT-2-style model on Tiny Shakespeare.

Launch:  lmstack train shakespeare_char --workdir runs/shakespeare_char \
             --config.data.path=../shared/data/tinyshakespeare/input.txt
Config:  nanoGPT's config/train_shakespeare_char.py as shrunk for CPU in its README:
         4 layers, 4 heads, d=128, block 64, batch 12, no dropout, no biases, tied
         embeddings; AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on matrices
         (embeddings included, as nanoGPT decays every 2-D weight), clip 1.0, warmup 100,
         cosine to 1e-4 at 2000 iterations; 90/10 train/validation split of the characters.
Expect:  validation loss 1.90-1.91 at iteration 2000 over the whole validation split
         (four seeds; nanoGPT's PyTorch CPU run reports 1.886 on 20 sampled batches); a step
         takes 45-53 ms on 2 cores (benchmark medians on a 2-core AMD EPYC in five sessions:
         README). Benchmark: python tools/bench_shakespeare.py.
Sweep:   sweep() is nanoGPT's learning rate and half and twice it, each with dropout 0 and 0.1
         (6 runs): lmstack sweep shakespeare_char --config.data.path=... [--parallel 2], then
         lmstack report runs/shakespeare_char for the table and plots.
"""

from configs import optimizers, smoke
from lmstack.config import parse_arg
from lmstack.configs.base import base_config
from lmstack.sweep import grid


def sweep():
    return grid(**{"optimizer.lr": [5e-4, 1e-3, 2e-3], "model.dropout": [0.0, 0.1]})


def get_config(arg: str | None = None):
    args = parse_arg(arg, allowed={"smoke": False})
    c = base_config()
    c.model.style = "gpt2"
    c.model.d_model = 128
    c.model.n_layers = 4
    c.model.n_heads = 4
    c.model.use_bias = False
    c.model.tie_embeddings = True
    c.model.dropout = 0.0
    c.model.scan_unroll = 4  # 4 layers: unrolled, the CPU backward pass runs ~2x faster
    c.data.source = "text"
    c.data.seq_len = 64
    c.data.val_fraction = 0.1
    c.data.tokenizer.kind = "char"
    c.train.batch_size = 12
    c.train.steps = 2000
    c.train.log_every = 50
    optimizers.nanogpt_adamw(c, lr=1e-3, b2=0.99, warmup_steps=100)  # its train_shakespeare_char.py
    # Data parallel over the host's devices (on a CPU lmstack makes one per core): batch 12
    # splits over 1, 2, 3, 4, 6 or 12 of them; elsewhere pass e.g. --config.mesh.data=4.
    c.mesh.data = -1
    c.checkpoint.every = 1000
    c.eval.every = 500
    c.eval.batches = 0  # the whole validation split
    c.eval.batch_size = 48  # divides 1, 2, 3, 4, 6, 8, 12, 16, 24 or 48 devices
    c.sample.prompt = "ROMEO:"
    c.sample.max_new_tokens = 56
    if args["smoke"]:
        smoke.shrink(c)
    return c
