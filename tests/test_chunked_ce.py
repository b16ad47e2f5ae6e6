"""Chunked output head + cross-entropy: the same numbers and gradients as the full logits,
without holding them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmstack import registry
from lmstack.config import ConfigError, compose, validate
from lmstack.objectives.causal_lm import token_cross_entropy
from lmstack.token_logps import chunked_cross_entropy, chunked_token_logps, token_logps
from lmstack.sharding import batch_sharding, make_mesh
from lmstack.step import compile_train_step
from lmstack.trainstate import init_state, model_factory
from tests.helpers import packed_batch, tiny_config

B, T, D, V = 3, 13, 16, 50  # T = 13 is not a multiple of the chunk (4)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    head = (rng.normal(size=(D, V)) / np.sqrt(D)).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = rng.random((B, T)) < 0.7
    return hidden, head, labels, mask


def test_chunked_token_logps_match_the_log_softmax_formula():
    hidden, head, labels, _ = _inputs()
    got = chunked_token_logps(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(labels), chunk=4, entropy=True)
    logits = hidden.astype(np.float64) @ head
    m = logits.max(-1, keepdims=True)
    logq = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    want_logp = np.take_along_axis(logq, labels[..., None], -1)[..., 0]
    want_entropy = -(np.exp(logq) * logq).sum(-1)
    assert got.logp.shape == got.entropy.shape == got.correct.shape == (B, T)
    assert got.logp.dtype == got.entropy.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got.logp), want_logp, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.entropy), want_entropy, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got.correct), logits.argmax(-1) == labels)
    whole = token_logps(jnp.asarray(hidden) @ jnp.asarray(head), jnp.asarray(labels))
    assert whole.entropy is None  # only computed when asked for
    for chunk in (1, 4, 13, 64):  # one position, a ragged last chunk, exact, longer than the sequence
        c = chunked_token_logps(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(labels), chunk=chunk)
        np.testing.assert_allclose(np.asarray(c.logp), np.asarray(whole.logp), rtol=0, atol=1e-5, err_msg=chunk)


def test_chunked_cross_entropy_gradients_equal_the_full_logits():
    hidden, head, labels, mask = _inputs(1)

    def full(h, w):
        aux = token_cross_entropy(jnp.matmul(h, w, preferred_element_type=jnp.float32), labels, mask)
        return aux["loss"], aux

    def chunked(h, w):
        aux = chunked_cross_entropy(h, w, labels, mask, chunk=4)
        return aux["loss"], aux

    (lf, af), gf = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, head)
    (lc, ac), gc = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, head)
    np.testing.assert_allclose(float(lc), float(lf), rtol=1e-6)
    assert float(ac["weight"]) == mask.sum() and float(ac["accuracy"]) == float(af["accuracy"])
    for a, b, name in zip(gc, gf, ("hidden", "head")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5, err_msg=name)
    assert not np.asarray(gc[0])[~mask].any()  # masked positions get no gradient


def test_chunk_must_be_positive():
    hidden, head, labels, _ = _inputs()
    with pytest.raises(ValueError, match=r"chunked_token_logps: chunk=0: must be >= 1 sequence positions"):
        chunked_token_logps(hidden, head, labels, chunk=0)


def test_the_backward_pass_does_not_hold_the_full_logits():
    """Compiled temp memory of loss + gradients: the (b, t, v) float32 logits (4 MiB here) and
    their gradient are live without chunking, one chunk's (1/16 of them) with it."""
    b, t, d, v = 2, 256, 32, 2048
    h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    y = jax.ShapeDtypeStruct((b, t), jnp.int32)
    full_bytes = b * t * v * 4

    def temp(loss):
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w, y).compile().memory_analysis().temp_size_in_bytes

    unchunked = temp(lambda h, w, y: token_cross_entropy(h @ w, y, y >= 0)["loss"])
    chunked = temp(lambda h, w, y: chunked_cross_entropy(h, w, y, y >= 0, chunk=16)["loss"])
    assert unchunked >= full_bytes
    assert chunked < full_bytes / 4, (chunked, unchunked)


def test_train_steps_with_chunks_match_steps_without():
    """lmstack's compiled train step, with tied embeddings (the table gets the lookup's and the
    head's gradient) on a data x tensor mesh (batch and each chunk's vocabulary axis sharded),
    SFT-style loss mask included. Plain SGD with learning rate 1 makes each update the
    gradient of the per-token loss itself, so equal parameters after a step mean equal
    gradients wrt every parameter."""
    cfg = tiny_config()
    cfg.objective.loss_chunk = 6  # 16 positions: chunks of 6, 6, 4
    rng = np.random.default_rng(0)
    batches = [packed_batch(rng, 8, 16) for _ in range(2)]
    for b in batches:
        b["loss_mask"] = (rng.random(b["tokens"].shape) < 0.6).astype(np.int32)
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2})
    make_model, _ = model_factory(cfg, vocab_size=256)
    schedule = optax.constant_schedule(1.0)
    tx = optax.sgd(schedule)
    graphdef, init, shardings = init_state(make_model, tx, mesh)
    assert "lm_head" not in init["params"]

    def run(objective_cfg):
        objective = registry.lookup("objective", "causal_lm")(objective_cfg)
        step = compile_train_step(graphdef, tx, schedule, objective, 1, shardings, batch_sharding(mesh))
        state, out = jax.tree.map(jnp.copy, init), []  # the step donates its state
        with jax.set_mesh(mesh):
            for i, b in enumerate(batches):
                state, metrics = step(state, jax.device_put(b, batch_sharding(mesh)), jax.random.key(i))
                out.append({k: float(metrics[k]) for k in ("loss", "accuracy")})
                out.append(jax.tree.map(np.asarray, state["params"]))
        return out

    chunked = run(compose(cfg))
    cfg.objective.loss_chunk = 0
    whole = run(compose(cfg))
    for got, want in zip(chunked, whole):
        for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("objective", ["causal_lm", "sft"])
def test_a_negative_loss_chunk_is_refused(objective):
    c = tiny_config()
    c.objective.name = objective
    c.objective.loss_chunk = -8
    with pytest.raises(ConfigError) as e:
        validate(compose(c))
    assert ("objective.loss_chunk=-8: must be >= 0 sequence positions (0: the whole sequence at once)"
            in str(e.value))
