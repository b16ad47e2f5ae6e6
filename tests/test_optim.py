"""Learning-rate schedules and weight-decay masks."""

import jax
import numpy as np
import pytest
from flax import nnx

from lmstack.configs.base import base_config
from lmstack.models.decoder import Decoder, DecoderConfig
from lmstack.optim import learning_rate_schedule, weight_decay_mask


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_shape(schedule):
    opt = base_config().optimizer
    opt.lr, opt.min_lr_ratio, opt.warmup_steps, opt.schedule = 1e-3, 0.1, 100, schedule
    f = learning_rate_schedule(opt, total_steps=2000)
    assert float(f(0)) == 0.0
    np.testing.assert_allclose(float(f(50)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(f(100)), 1e-3, rtol=1e-6)
    end = {"cosine": 1e-4, "linear": 1e-4, "constant": 1e-3}[schedule]
    np.testing.assert_allclose(float(f(2000)), end, rtol=1e-5)
    if schedule == "cosine":  # halfway through the decay: the cosine's midpoint
        np.testing.assert_allclose(float(f(1050)), 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=1e-5)


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_mask(decay_embeddings):
    cfg = DecoderConfig(style="gpt2", vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2,
                        head_dim=8, d_ff=32, max_seq_len=8, use_bias=True, tie_embeddings=True)
    params = nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    mask = weight_decay_mask(params, decay_embeddings)
    flat = {"/".join(map(str, path)): bool(v) for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = {k for k, v in flat.items() if v}
    matrices = {f"blocks/attn/{n}/value" for n in "qkvo"} | {"blocks/mlp/up/value", "blocks/mlp/down/value"}
    tables = {"embed/value", "pos_embed/value"}
    expected = matrices | (tables if decay_embeddings else set())
    assert {k.replace("'", "").replace("[", "").replace("]", "").replace(".", "") for k in decayed} == expected
    # norms and biases are never decayed even though stacked layers make them 2-D
    assert not any(("norm" in k or "bias" in k) and v for k, v in flat.items())
