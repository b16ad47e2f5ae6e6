"""The llama-style Decoder against the numpy reference forward (tests/numpy_llama.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack.models.decoder import Decoder, DecoderConfig
from tests import numpy_llama


def tiny_llama(tie: bool) -> DecoderConfig:
    """init_std 0.2 gives logits of order 1-5, where fp32 rounding stays a few 1e-6."""
    return DecoderConfig(style="llama", vocab_size=96, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8,
                         d_ff=80, max_seq_len=32, tie_embeddings=tie, rope_theta=500.0, norm_eps=1e-5, init_std=0.2)


def randomise(model: Decoder, seed: int) -> None:
    """Norm scales away from 1 so a mixed-up norm would show in the logits."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "scale":
            var.set_value(jnp.asarray(1 + 0.3 * rng.standard_normal(var.shape), jnp.float32))


def as_gguf_layout(model: Decoder) -> dict[str, np.ndarray]:
    """Our parameter tree as the reference's (out, in) matrices with HF q/k row order."""
    c = model.cfg
    b = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model.blocks, nnx.Param)))
    w = {"token_embd.weight": np.asarray(model.embed[...]),
         "output_norm.weight": np.asarray(model.final_norm.scale[...])}
    if not c.tie_embeddings:
        w["output.weight"] = np.asarray(model.lm_head[...]).T
    for i in range(c.n_layers):
        a, m = b["attn"], b["mlp"]
        w[f"blk.{i}.attn_q.weight"] = a["q"]["weight"][i].reshape(c.d_model, -1).T
        w[f"blk.{i}.attn_k.weight"] = a["k"]["weight"][i].reshape(c.d_model, -1).T
        w[f"blk.{i}.attn_v.weight"] = a["v"]["weight"][i].reshape(c.d_model, -1).T
        w[f"blk.{i}.attn_output.weight"] = a["o"]["weight"][i].reshape(-1, c.d_model).T
        w[f"blk.{i}.ffn_gate.weight"] = m["gate"]["weight"][i].T
        w[f"blk.{i}.ffn_up.weight"] = m["up"]["weight"][i].T
        w[f"blk.{i}.ffn_down.weight"] = m["down"]["weight"][i].T
        w[f"blk.{i}.attn_norm.weight"] = b["attn_norm"]["scale"][i]
        w[f"blk.{i}.ffn_norm.weight"] = b["mlp_norm"]["scale"][i]
    return w


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_decoder_matches_numpy_reference(tie):
    cfg = tiny_llama(tie)
    model = Decoder(cfg, rngs=nnx.Rngs(params=0))
    randomise(model, seed=1)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(2, 20))
    ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    w = as_gguf_layout(model)
    for row in range(tokens.shape[0]):
        ref = numpy_llama.forward(w, tokens[row], n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                                  n_kv_heads=cfg.n_kv_heads, rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps)
        assert np.abs(ref).max() > 1.0  # logits of order one: the tolerance below is a real check
        np.testing.assert_allclose(ours[row], ref, atol=1e-5, rtol=0)
