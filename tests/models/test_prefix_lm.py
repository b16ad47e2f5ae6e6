"""Prefix LM on the decoder: bidirectional within each document's prefix, causal after it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack.models.decoder import Decoder, DecoderConfig
from lmstack.models.layers import attention_mask

VOCAB, T, PREFIX = 64, 12, 5


def tiny(style="llama"):
    cfg = DecoderConfig(style=style, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
                        n_kv_heads=2 if style == "llama" else 4, head_dim=8, d_ff=64, max_seq_len=32, init_std=0.2)
    return Decoder(cfg, rngs=nnx.Rngs(0))


@nnx.jit
def forward(model, tokens, segment_ids, prefix_mask):
    return model(tokens, segment_ids=segment_ids, prefix_mask=prefix_mask)


def bump(x, i):
    return x.at[:, i].set((x[:, i] + 1) % VOCAB)


def changed_positions(model, tokens, i, seg, prefix):
    """Positions whose logits move when token ``i`` changes."""
    a, b = forward(model, tokens, seg, prefix), forward(model, bump(tokens, i), seg, prefix)
    return set(np.nonzero(np.abs(np.asarray(a - b)).max(axis=(0, 2)) > 1e-6)[0].tolist())


def test_reference_mask():
    """attention_mask against a loop over (query, key): same document, and key <= query or
    both in the prefix."""
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0]])
    prefix = np.array([[1, 1, 0, 0, 1, 1, 0, 0]], bool)
    row = np.arange(8)[None]
    got = np.asarray(attention_mask(jnp.asarray(seg), jnp.asarray(seg), jnp.asarray(row), jnp.asarray(row),
                                    q_prefix_bt=jnp.asarray(prefix), k_prefix_bs=jnp.asarray(prefix)))[0, 0]
    want = [[seg[0, q] == seg[0, k] and (k <= q or (prefix[0, q] and prefix[0, k])) for k in range(8)]
            for q in range(8)]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_prefix_sees_itself_bidirectionally_and_never_the_suffix(style):
    model = tiny(style)
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, VOCAB)
    seg = jnp.ones((2, T), jnp.int32)
    prefix = jnp.broadcast_to(jnp.arange(T) < PREFIX, (2, T))
    no_prefix = jnp.zeros((2, T), bool)
    for i in range(T):
        with_mask = changed_positions(model, tokens, i, seg, prefix)
        causal = changed_positions(model, tokens, i, seg, no_prefix)
        # without a prefix, a token only ever affects itself and later positions
        assert causal == set(range(i, T)), (i, causal)
        if i < PREFIX:  # a prefix token reaches the whole prefix, earlier positions included
            assert with_mask == set(range(T)), (i, with_mask)
        else:  # a suffix token never reaches the prefix (nor earlier suffix positions)
            assert with_mask == set(range(i, T)), (i, with_mask)
    # an all-false prefix mask is exactly the causal model
    causal_model = nnx.jit(lambda m, t, s: m(t, segment_ids=s))(model, tokens, seg)
    np.testing.assert_allclose(forward(model, tokens, seg, no_prefix), causal_model, rtol=0, atol=1e-6)


def test_packed_prefixes_stay_inside_their_documents():
    model = tiny()
    tokens = jax.random.randint(jax.random.key(2), (1, T), 0, VOCAB)
    seg = jnp.array([[1] * 6 + [2] * 6], jnp.int32)
    prefix = jnp.array([[1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0]], bool)
    assert changed_positions(model, tokens, 2, seg, prefix) == set(range(6))  # doc 1 only
    assert changed_positions(model, tokens, 4, seg, prefix) == {4, 5}
    assert changed_positions(model, tokens, 7, seg, prefix) == set(range(6, 12))  # doc 2 only
    assert changed_positions(model, tokens, 9, seg, prefix) == {9, 10, 11}


def test_prefill_with_prefix_then_cached_decoding_matches_the_full_pass():
    """Generation for a prefix LM: the prefix goes in as one prefill with its mask, the rest
    is decoded token by token from the cache; the logits equal one full masked pass."""
    model = tiny()
    tokens = jax.random.randint(jax.random.key(3), (2, T), 0, VOCAB)
    prefix = jnp.broadcast_to(jnp.arange(T) < PREFIX, (2, T))
    full = model(tokens, prefix_mask=prefix)
    cache = model.init_cache(2, T)
    logits, cache = model(tokens[:, :PREFIX], prefix_mask=prefix[:, :PREFIX], cache=cache)
    steps = [logits]
    step = nnx.jit(lambda m, tok, c: m(tok, cache=c))
    for i in range(PREFIX, T):
        logits, cache = step(model, tokens[:, i:i + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
