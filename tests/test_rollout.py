"""Rollouts: left-padded prompts continue as they would alone, the log-probs are the policy's
(a teacher-forced forward pass of the same tokens), n samples share a prefill, stop ids end
rows, and one compile serves a bucket."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack.config import ConfigError
from lmstack.data.sources import DataError
from lmstack.models.decoder import Decoder, DecoderConfig
from lmstack.rollout import _rollout, sample_rollouts
from lmstack.sharding import MeshError, make_mesh, state_shardings

PROMPTS = [[5, 9, 14, 2, 33, 7, 21, 40], [3, 17, 60], [11, 12, 13, 50, 8], [44]]  # lengths 8, 3, 5, 1
BUDGET, NEW, N = 8, 6, 2


def tiny(style):
    cfg = DecoderConfig(style=style, vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                        n_kv_heads=2 if style == "llama" else 4, head_dim=8, d_ff=64, max_seq_len=32, init_std=0.2)
    return nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def gpt2():
    return tiny("gpt2")


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")


@pytest.fixture(scope="module")
def greedy(gpt2):
    """gpt2 (learned positions, where a padding offset would show first), greedy, no stop ids."""
    return sample_rollouts(*gpt2, PROMPTS, n=N, max_new_tokens=NEW, max_prompt_len=BUDGET, rng=jax.random.key(0),
                           temperature=0.0)


@pytest.fixture(scope="module")
def sampled(llama):
    """llama, sampled at temperature 0.8 with top-k: the log-probs must still be the untempered policy's."""
    return sample_rollouts(*llama, PROMPTS, n=N, max_new_tokens=NEW, max_prompt_len=BUDGET, rng=jax.random.key(1),
                           temperature=0.8, top_k=20)


@jax.jit(static_argnums=0)
def forward(graphdef, state, tokens_bt):
    return nnx.merge(graphdef, state)(tokens_bt)


def teacher_forced(model, prompts, rollout, n):
    """Reference: each row's own prompt (no left padding) and completion through the model without
    a cache; (log-softmax at the completion's places, logits there). Rows sit at the start of a
    fixed buffer (causal attention ignores what lies beyond), so this compiles once."""
    graphdef, state = model
    row_prompts = [p for p in prompts for _ in range(n)]
    comp = np.asarray(rollout.completion_tokens)
    lengths = np.asarray(rollout.completion_lengths)
    buf = np.zeros((comp.shape[0], BUDGET + NEW), np.int32)
    for r, (p, c) in enumerate(zip(row_prompts, comp)):
        buf[r, :len(p) + lengths[r]] = list(p) + list(c[:lengths[r]])
    logits = np.asarray(forward(graphdef, state, buf))
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    at = [[len(p) - 1 + j for j in range(NEW)] for p in row_prompts]
    rows = np.arange(comp.shape[0])[:, None]
    return logp[rows, at], logits[rows, at]


def check_against_teacher_forced(model, prompts, rollout, n):
    logp, logits = teacher_forced(model, prompts, rollout, n)
    mask = np.asarray(rollout.completion_mask)
    tokens = np.asarray(rollout.completion_tokens)
    want = np.where(mask, np.take_along_axis(logp, tokens[..., None], -1)[..., 0], 0.0)
    np.testing.assert_allclose(np.asarray(rollout.completion_logps), want, rtol=0, atol=1e-5)
    return logits, mask, tokens


def test_logps_equal_a_teacher_forced_pass(llama, sampled, gpt2, greedy):
    assert sampled.completion_logps.dtype == jnp.float32 and sampled.completion_tokens.dtype == jnp.int32
    check_against_teacher_forced(llama, PROMPTS, sampled, N)  # sampled at T=0.8, top-k 20: untempered log-probs
    logits, mask, tokens = check_against_teacher_forced(gpt2, PROMPTS, greedy, N)
    np.testing.assert_array_equal(tokens[mask], logits.argmax(-1)[mask])  # greedy: the unpadded argmax


def test_left_padded_row_continues_as_its_prompt_alone(gpt2, greedy):
    alone = sample_rollouts(*gpt2, [PROMPTS[1]], n=N, max_new_tokens=NEW, max_prompt_len=len(PROMPTS[1]),
                            rng=jax.random.key(0), temperature=0.0)
    padded_rows = slice(N * 1, N * 2)  # prompt 1 (3 tokens) carries 5 padding tokens in the batch
    np.testing.assert_array_equal(np.asarray(greedy.prompt_tokens[padded_rows, -3:]), np.asarray(alone.prompt_tokens))
    np.testing.assert_array_equal(np.asarray(greedy.completion_tokens[padded_rows]),
                                  np.asarray(alone.completion_tokens))
    np.testing.assert_allclose(np.asarray(greedy.completion_logps[padded_rows]), np.asarray(alone.completion_logps),
                               rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(greedy.prompt_lengths), np.repeat([8, 3, 5, 1], N))


def test_samples_share_the_prefill_and_differ_when_sampled(sampled, greedy):
    tokens = np.asarray(sampled.completion_tokens).reshape(len(PROMPTS), N, NEW)
    prompts = np.asarray(sampled.prompt_tokens).reshape(len(PROMPTS), N, BUDGET)
    assert (prompts[:, 0] == prompts[:, 1]).all()
    assert all((t[0] != t[1]).any() for t in tokens)  # each prompt's samples differ
    g = np.asarray(greedy.completion_tokens).reshape(len(PROMPTS), N, NEW)
    gl = np.asarray(greedy.completion_logps).reshape(len(PROMPTS), N, NEW)
    assert (g[:, 0] == g[:, 1]).all() and (gl[:, 0] == gl[:, 1]).all()
    assert len({tuple(t[0]) for t in g}) == len(PROMPTS)  # and the prompts' rows are their own


def test_stop_ids_end_rows(gpt2, greedy):
    free = np.asarray(greedy.completion_tokens)
    stops = [int(free[0, 2]), int(free[2 * N, 4])]
    pad = 63
    out = sample_rollouts(*gpt2, PROMPTS, n=N, max_new_tokens=NEW, max_prompt_len=BUDGET, rng=jax.random.key(0),
                          temperature=0.0, stop_ids=stops, pad_id=pad)
    hits = np.isin(free, stops)
    want_len = np.where(hits.any(1), hits.argmax(1) + 1, NEW)
    assert want_len[0] == 3 and want_len[2 * N] <= 5 and (want_len == NEW).any()  # the test covers both cases
    np.testing.assert_array_equal(np.asarray(out.completion_lengths), want_len)
    np.testing.assert_array_equal(np.asarray(out.stopped), hits.any(1))
    mask = np.arange(NEW) < want_len[:, None]
    np.testing.assert_array_equal(np.asarray(out.completion_mask), mask)
    np.testing.assert_array_equal(np.asarray(out.completion_tokens), np.where(mask, free, pad))
    # the pad id fills the prompts' left padding too, and changes nothing the rows see
    np.testing.assert_allclose(np.asarray(out.completion_logps), np.where(mask, np.asarray(greedy.completion_logps), 0),
                               rtol=0, atol=1e-6)


def test_one_compile_per_bucket(gpt2, greedy):
    before = _rollout._cache_size()
    other = [[1, 2], [3, 4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14]]  # other lengths, same budget
    out = sample_rollouts(*gpt2, other, n=N, max_new_tokens=NEW, max_prompt_len=BUDGET, rng=jax.random.key(0),
                          temperature=0.0, stop_ids=[7])
    assert _rollout._cache_size() == before
    check_against_teacher_forced(gpt2, other, out, N)


def test_sharded_rollout_equals_one_device(llama, sampled):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state = llama
    state = jax.device_put(state, state_shardings(state, mesh))
    out = sample_rollouts(graphdef, state, PROMPTS, n=N, max_new_tokens=NEW, max_prompt_len=BUDGET,
                          rng=jax.random.key(1), temperature=0.8, top_k=20, mesh=mesh)
    assert out.completion_tokens.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(out.completion_tokens), np.asarray(sampled.completion_tokens))
    np.testing.assert_allclose(np.asarray(out.completion_logps), np.asarray(sampled.completion_logps),
                               rtol=0, atol=1e-5)


def test_bad_input_is_one_line(gpt2):
    kw = dict(n=N, max_new_tokens=NEW, max_prompt_len=BUDGET, rng=jax.random.key(0))
    with pytest.raises(DataError) as e:
        sample_rollouts(*gpt2, PROMPTS + [list(range(12))], budget_key="objective.max_prompt_len", **kw)
    assert str(e.value) == ("prompt 4 has 12 tokens, more than the rollout budget objective.max_prompt_len=8: "
                            "raise objective.max_prompt_len or shorten the prompt")
    with pytest.raises(DataError, match=r"^prompt 1 is empty: a rollout continues at least one token"):
        sample_rollouts(*gpt2, [[1], []], **kw)
    with pytest.raises(ConfigError, match=r"^stop ids \[64\] are outside the model's vocabulary of 64 ids"):
        sample_rollouts(*gpt2, PROMPTS, stop_ids=[2, 64], **kw)
    with pytest.raises(ConfigError, match=r"^a prompt of 8 tokens \+ max_new_tokens \(30\) exceeds the model's 32 "
                                          r"learned positions"):
        sample_rollouts(*gpt2, PROMPTS, **dict(kw, max_new_tokens=30))
    with pytest.raises(MeshError, match=r"^3 rollout prompts do not split over the mesh's 4 data-parallel devices"):
        sample_rollouts(*gpt2, PROMPTS[:3], mesh=make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), **kw)


def test_left_padding_after_a_soft_prompt():
    """Prompt tuning's virtual tokens sit in the cache before the padding: rows still see them."""
    from lmstack.peft.prompt_tuning import apply_prompt_tuning

    graphdef, state = tiny("llama")
    model = nnx.merge(graphdef, state)
    apply_prompt_tuning(model, 3, "random", jax.random.key(2))
    tuned = nnx.split(model)
    out = sample_rollouts(*tuned, PROMPTS, n=1, max_new_tokens=NEW, max_prompt_len=BUDGET, rng=jax.random.key(0),
                          temperature=0.0)
    logits, mask, tokens = check_against_teacher_forced(tuned, PROMPTS, out, 1)
    np.testing.assert_array_equal(tokens[mask], logits.argmax(-1)[mask])
