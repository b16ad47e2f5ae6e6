"""Learning-rate schedules and weight-decay masks."""

import jax
import numpy as np
import pytest
from flax import nnx

from lmstack.configs.base import base_config
from lmstack.models.decoder import Decoder, DecoderConfig
from lmstack.optim import learning_rate_schedule, weight_decay_mask


def reference_lr(count, *, lr, warmup, decay_steps, min_lr_ratio, schedule):
    """nanoGPT's get_lr: warmup lr * (it + 1) / (warmup + 1), then the decay to lr * min_lr_ratio."""
    if count < warmup:
        return lr * (count + 1) / (warmup + 1)
    if schedule == "constant":
        return lr
    end = lr * min_lr_ratio
    ratio = min(count - warmup, decay_steps - warmup) / (decay_steps - warmup)
    if schedule == "cosine":
        return end + 0.5 * (1.0 + np.cos(np.pi * ratio)) * (lr - end)
    return lr + ratio * (end - lr)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 100])
def test_schedule_matches_the_formula(schedule, warmup):
    opt = base_config().optimizer
    opt.lr, opt.min_lr_ratio, opt.warmup_steps, opt.schedule = 1e-3, 0.1, warmup, schedule
    f = learning_rate_schedule(opt, total_steps=2000)
    counts = np.arange(2101)
    got = np.array([float(f(c)) for c in counts])
    want = np.array([reference_lr(c, lr=1e-3, warmup=warmup, decay_steps=2000, min_lr_ratio=0.1, schedule=schedule)
                     for c in counts])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
    assert got[0] > 0  # the first update moves the weights
    assert got[warmup] == pytest.approx(1e-3, rel=1e-6)  # the peak comes right after warmup
    assert (got[:warmup + 1] <= 1e-3 * (1 + 1e-6)).all()


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_mask(decay_embeddings):
    cfg = DecoderConfig(style="gpt2", vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2,
                        head_dim=8, d_ff=32, max_seq_len=8, use_bias=True, tie_embeddings=True)
    params = nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    mask = weight_decay_mask(params, decay_embeddings)
    flat = {"/".join(map(str, path)): bool(v) for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = {k for k, v in flat.items() if v}
    matrices = {f"blocks/attn/{n}/weight/value" for n in "qkvo"} | {"blocks/mlp/up/weight/value",
                                                                 "blocks/mlp/down/weight/value"}
    tables = {"embed/value", "pos_embed/value"}
    expected = matrices | (tables if decay_embeddings else set())
    assert {k.replace("'", "").replace("[", "").replace("]", "").replace(".", "") for k in decayed} == expected
    # norms and biases are never decayed even though stacked layers make them 2-D
    assert not any(("norm" in k or "bias" in k) and v for k, v in flat.items())
