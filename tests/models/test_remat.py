"""model.remat=projections keeps the named projection outputs and the attention output for
the backward pass, and changes no gradient."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmstack.models.decoder import Block, Decoder, DecoderConfig
from lmstack.models.layers import PROJECTION_CHECKPOINTS, REMAT_POLICIES

CFG = dict(style="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
           max_seq_len=32, init_std=0.2)


def test_projections_policy_saves_exactly_the_named_matmul_outputs(capsys):
    graphdef, params = nnx.split(Block(DecoderConfig(**CFG), rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (2, 12, 32))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))

    def block_loss(p, x):
        y, _ = nnx.merge(graphdef, p)(x, pos, None, None, None, None, True)
        return jnp.sum(y * y)

    jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(block_loss, policy=REMAT_POLICIES["projections"]),
                                            params, x)
    saved = capsys.readouterr().out.splitlines()
    named = [line.split("named '")[1].split("'")[0] for line in saved if "named '" in line]
    assert sorted(named) == sorted(PROJECTION_CHECKPOINTS)
    # apart from them only the arguments (weights, the block's input) and the positions
    assert all("named '" in line or "from the argument" in line or "from a constant" in line for line in saved), saved


@jax.jit(static_argnums=0)
def loss_and_grads(graphdef, params, tokens, segment_ids):
    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1], segment_ids=segment_ids)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[:, 1:, None], -1))

    return jax.value_and_grad(loss)(params)


def test_projections_policy_changes_no_gradient():
    tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, 64)
    seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12])
    ref_loss, ref = loss_and_grads(*nnx.split(Decoder(DecoderConfig(**CFG), rngs=nnx.Rngs(0))), tokens, seg)
    got_loss, got = loss_and_grads(*nnx.split(Decoder(DecoderConfig(**CFG, remat="projections"), rngs=nnx.Rngs(0))),
                                   tokens, seg)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
