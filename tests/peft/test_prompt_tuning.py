"""Prompt tuning: the decoder runs [soft prompt; tokens] (numpy reference and the
inputs_embeds entry), packed documents each see the prompt as if alone, the primed KV
cache, the initialisations, the trainable set, the count and the family check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack.config import ConfigError, compose, validate
from lmstack.configs.base import base_config
from lmstack.models.decoder import Decoder, DecoderConfig
from lmstack.peft.prompt_tuning import SoftPromptParam, apply_prompt_tuning, prompt_tuning_parameter_count
from tests import numpy_llama
from tests.models.test_decoder_numpy import as_gguf_layout, randomise
from tests.peft.common import VOCAB, assert_only_adapters_train, build, tiny_cfg, train_steps

N_VIRTUAL = 3


def prompted(sliding_window: int = 0) -> Decoder:
    """A llama decoder (init_std 0.2: logits of order one) with a random 3-token soft prompt."""
    cfg = DecoderConfig(style="llama", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                        d_ff=48, max_seq_len=32, tie_embeddings=True, rope_theta=500.0, init_std=0.2,
                        sliding_window=sliding_window)
    model = Decoder(cfg, rngs=nnx.Rngs(params=0))
    randomise(model, seed=1)
    apply_prompt_tuning(model, N_VIRTUAL, "random", jax.random.key(2))
    return model


def test_logits_are_the_numpy_reference_run_on_prompt_then_tokens():
    model = prompted()
    tokens = np.random.default_rng(3).integers(0, VOCAB, (2, 7))
    ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    assert ours.shape == (2, 7, VOCAB)  # the virtual positions are dropped
    w = as_gguf_layout(model)
    # the virtual tokens as extra rows of the embedding table, read by ids VOCAB..VOCAB+2
    w["output.weight"] = w["token_embd.weight"]
    w["token_embd.weight"] = np.concatenate([w["token_embd.weight"], np.asarray(model.soft_prompt[...])])
    c = model.cfg
    for row in range(2):
        ids = np.concatenate([np.arange(VOCAB, VOCAB + N_VIRTUAL), tokens[row]])
        ref = numpy_llama.forward(w, ids, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                                  rope_theta=c.rope_theta, norm_eps=c.norm_eps)[N_VIRTUAL:]
        assert np.abs(ref).max() > 1.0
        np.testing.assert_allclose(ours[row], ref, atol=1e-5, rtol=0)


def test_equals_the_inputs_embeds_entry_fed_the_prompt_by_hand():
    model = prompted()
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, (2, 6)), jnp.int32)
    ours = model(tokens)
    prompt = model.soft_prompt[...]
    by_hand = jnp.concatenate([jnp.broadcast_to(prompt, (2,) + prompt.shape), model.embed[...][tokens]], axis=1)
    model.soft_prompt = None  # the plain decoder
    np.testing.assert_allclose(np.asarray(model(None, inputs_embeds=by_hand))[:, N_VIRTUAL:], np.asarray(ours),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("window", [0, 5])
def test_each_packed_document_sees_the_prompt_as_if_it_ran_alone(window):
    model = prompted(window)
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, VOCAB, 4), rng.integers(0, VOCAB, 6)
    row = jnp.asarray(np.concatenate([a, b])[None], jnp.int32)
    segments = jnp.asarray([[1] * 4 + [2] * 6], jnp.int32)
    positions = jnp.asarray([list(range(4)) + list(range(6))], jnp.int32)
    packed = np.asarray(model(row, segment_ids=segments, positions=positions))[0]
    alone_a = np.asarray(model(jnp.asarray(a[None], jnp.int32)))[0]
    alone_b = np.asarray(model(jnp.asarray(b[None], jnp.int32)))[0]
    np.testing.assert_allclose(packed[:4], alone_a, atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[4:], alone_b, atol=1e-5, rtol=0)


def test_cached_decoding_matches_the_full_forward():
    model = prompted()
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, VOCAB, (2, 8)), jnp.int32)
    full = np.asarray(model(tokens))
    cache = model.init_cache(2, 8)
    assert cache["k"].shape[2] == 8 + N_VIRTUAL and int(cache["index"]) == N_VIRTUAL
    logits, cache = model(tokens[:, :5], cache=cache)
    steps = [np.asarray(logits)]
    for i in range(5, 8):
        logits, cache = model(tokens[:, i:i + 1], cache=cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


def test_sample_vocab_copies_vocabulary_rows_and_count_is_n_times_d():
    model, mcfg = build("prompt_tuning", num_virtual_tokens=5)
    prompt, table = np.asarray(model.soft_prompt[...]), np.asarray(model.embed[...])
    assert prompt.shape == (5, 32) and isinstance(model.soft_prompt, SoftPromptParam)
    assert all((table == p).all(axis=1).any() for p in prompt)
    assert prompt_tuning_parameter_count(mcfg, 5) == 5 * 32 == model.soft_prompt.size
    smol = DecoderConfig(style="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         head_dim=64, d_ff=1536, max_seq_len=2048)
    assert prompt_tuning_parameter_count(smol, 20) == 11_520


def test_prompt_tuning_trains_only_the_soft_prompt():
    before, after, losses = train_steps(tiny_cfg("prompt_tuning", num_virtual_tokens=4))
    assert_only_adapters_train(before, after, losses, ["soft_prompt"])


def test_unsupported_settings_are_config_errors():
    c = base_config()
    c.model.name, c.peft.name = "encoder", "prompt_tuning"
    with pytest.raises(ConfigError, match=r"peft.name=prompt_tuning supports model.name=decoder, not 'encoder': "
                                          r"choose another model family or a method for every family"):
        validate(compose(c))
    c = tiny_cfg("prompt_tuning", num_virtual_tokens=4)
    c.model.style = "gpt2"
    with pytest.raises(ConfigError, match=r"peft.num_virtual_tokens=4 with data.seq_len=8 needs 12 learned positions, "
                                          r"but model.max_seq_len is 8: raise model.max_seq_len or use fewer virtual "
                                          r"tokens"):
        validate(c)
