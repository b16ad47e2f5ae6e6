"""Cached decoding yields the same tokens as recomputing the whole sequence each step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack.generate import generate, sample_token
from lmstack.models.decoder import Decoder, DecoderConfig


def tiny(style):
    cfg = DecoderConfig(style=style, vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                        n_kv_heads=2 if style == "llama" else 4, head_dim=8, d_ff=64, max_seq_len=32, init_std=0.2)
    return Decoder(cfg, rngs=nnx.Rngs(0))


def generate_by_recomputation(model, prompt, n, rng, **sampling):
    """Reference: run the full model over the whole sequence for every new token. The
    buffer has a fixed length (causal attention ignores what lies beyond), so it compiles once."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, toks: nnx.merge(graphdef, st)(toks))
    b, t = prompt.shape
    tokens = jnp.concatenate([prompt, jnp.zeros((b, n), prompt.dtype)], axis=1)
    for i, r in enumerate(jax.random.split(rng, n)):
        logits = forward(state, tokens)[:, t + i - 1]
        tokens = tokens.at[:, t + i].set(sample_token(logits, r, **sampling))
    return tokens[:, t:]


@pytest.mark.parametrize("style", ["llama", "gpt2"])
@pytest.mark.parametrize("sampling", [
    dict(temperature=0.0, top_k=0, top_p=1.0),
    dict(temperature=1.0, top_k=10, top_p=0.9),
])
def test_cached_equals_recomputed(style, sampling):
    model = tiny(style)
    prompt = jax.random.randint(jax.random.key(3), (3, 7), 0, 64)
    rng = jax.random.key(5)
    cached = generate(model, prompt, max_new_tokens=12, rng=rng, **sampling)
    full = generate_by_recomputation(model, prompt, 12, rng, **sampling)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(full))
    if sampling["temperature"] == 0.0:  # greedy is deterministic: a different key changes nothing
        again = generate(model, prompt, max_new_tokens=12, rng=jax.random.key(9), **sampling)
        np.testing.assert_array_equal(np.asarray(again), np.asarray(cached))


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)

    def draw(**kw):
        one = lambda k: sample_token(logits, k, temperature=1.0, **kw)[0]  # noqa: E731
        return np.asarray(jax.jit(jax.vmap(one))(keys))

    assert set(draw(top_k=2, top_p=1.0)) == {0, 1}
    assert set(draw(top_k=0, top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draw(top_k=0, top_p=0.85)) == {0, 1, 2}
    counts = np.bincount(draw(top_k=0, top_p=1.0), minlength=4) / 400
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.07)


def test_learned_positions_limit_is_a_clear_error():
    with pytest.raises(ValueError, match="exceeds the model's learned positions"):
        generate(tiny("gpt2"), jnp.zeros((1, 30), jnp.int32), max_new_tokens=5, rng=jax.random.key(0))


def sliding_by_recomputation(model, prompt, n, window):
    """Reference for generate_sliding (greedy): the same chunk schedule, each token computed by a
    full forward pass over its conditioning. The conditioning sits at the start of a buffer of
    ``window`` tokens (causal attention ignores what lies beyond it), so it compiles once."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, toks: nnx.merge(graphdef, st)(toks))

    def last_logits(ctx):
        buffer = np.zeros((ctx.shape[0], window), ctx.dtype)
        buffer[:, :ctx.shape[1]] = ctx
        return forward(state, jnp.asarray(buffer))[:, ctx.shape[1] - 1]

    chunk, ctx, out = max(1, window // 4), np.asarray(prompt)[:, -window:], []
    keep = window - chunk
    while len(out) < n:
        if ctx.shape[1] >= window:
            ctx = ctx[:, -keep:]
        for _ in range(min(n - len(out), window - ctx.shape[1])):
            tok = np.asarray(jnp.argmax(last_logits(ctx), axis=-1))
            out.append(tok)
            ctx = np.concatenate([ctx, tok[:, None]], axis=1)
    return np.stack(out, axis=1)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
@pytest.mark.parametrize("prompt_len", [7, 40])  # inside the 32-token window, and longer than it
def test_sliding_generation_returns_every_token_asked_for(style, prompt_len):
    from lmstack.generate import generate_sliding

    model = tiny(style)
    prompt = jax.random.randint(jax.random.key(3), (2, prompt_len), 0, 64)
    out = generate_sliding(model, prompt, max_new_tokens=36, rng=jax.random.key(0), window=32)
    assert out.shape == (2, 36)
    np.testing.assert_array_equal(np.asarray(out), sliding_by_recomputation(model, prompt, 36, 32))
    if prompt_len + 20 <= 32:  # inside the window it is plain generate
        np.testing.assert_array_equal(
            np.asarray(generate_sliding(model, prompt, max_new_tokens=20, rng=jax.random.key(0), window=32)),
            np.asarray(generate(model, prompt, max_new_tokens=20, rng=jax.random.key(0))))
