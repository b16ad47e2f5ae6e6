"""The compiled train step: traces once, accumulation equals the full batch, sharding parity."""

import jax
import numpy as np
import pytest
from flax import nnx

from lmstack import registry
from lmstack.config import compose
from lmstack.models.decoder import Decoder, DecoderConfig
from lmstack.optim import make_optimizer, schedule_count
from lmstack.sharding import batch_sharding, make_mesh
from lmstack.step import compile_train_step
from lmstack.trainstate import init_state, model_factory
from tests.helpers import packed_batch, run_steps, tiny_config


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [packed_batch(rng, 8, 16) for _ in range(3)]


@pytest.fixture(scope="module")
def single_device(batches):
    """The tiny llama config's three steps on one device, the reference of the tests below:
    (losses, final state, compiled step)."""
    return run_steps(tiny_config(), (1, 1, 1), batches)


def test_traces_once(single_device):
    losses, _, step = single_device
    assert step._cache_size() == 1
    assert losses[2] < losses[0]


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_gradient_accumulation_matches_full_batch(batches, single_device, style):
    full, s_full, _ = single_device if style == "llama" else run_steps(tiny_config(style), (1, 1, 1), batches)
    acc, s_acc, _ = run_steps(tiny_config(style, microbatches=4), (1, 1, 1), batches)
    np.testing.assert_allclose(acc, full, rtol=0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s_acc["params"]), jax.tree.leaves(s_full["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 2, 4)]


def test_sharding_parity(batches, single_device):
    ref, _, _ = single_device
    for shape in MESHES:
        losses, state, _ = run_steps(tiny_config(), shape, batches)
        np.testing.assert_allclose(losses, ref, rtol=0, atol=1e-5, err_msg=f"mesh {shape}")
        # parameters really are sharded as the rules say
        params = state["params"]
        q = params["blocks"]["attn"]["q"]["weight"][...]  # (layers, embed, heads, head_dim)
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
        fsdp, tensor = shape[1], shape[2]
        assert q.addressable_shards[0].data.shape == (2, 64 // fsdp, 8 // tensor, 8)
        embed = params["embed"][...]  # (vocab, embed)
        assert embed.addressable_shards[0].data.shape == (256 // tensor, 64 // fsdp)


class FrozenWeight(nnx.Variable):
    """A variable the trainer must carry but never update (like a DPO reference policy)."""


class WithFrozenPart(nnx.Module):
    def __init__(self, cfg, *, rngs):
        self.cfg = cfg
        self.policy = Decoder(cfg, rngs=rngs)
        ref = Decoder(cfg, rngs=nnx.Rngs(params=123))
        self.reference_embed = FrozenWeight(ref.embed[...], out_sharding=("vocab", "embed"))

    def __call__(self, tokens, **kw):
        # the frozen weights shift the logits, so the loss depends on them
        return self.policy(tokens, **kw) + 0.1 * (tokens[..., None] == 0) * self.reference_embed[...][:, 0]


def test_non_param_variables_are_carried_not_trained(batches):
    cfg = tiny_config()
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    mcfg = DecoderConfig.from_config(compose(cfg).model, vocab_size=256, max_seq_len=16)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    graphdef, state, shardings = init_state(lambda: WithFrozenPart(mcfg, rngs=nnx.Rngs(params=0)), tx, mesh)
    frozen_before = np.asarray(state["frozen"]["reference_embed"][...])
    params_before = np.asarray(state["params"]["policy"]["embed"][...])
    objective = registry.lookup("objective", "causal_lm")(compose(cfg))
    step = compile_train_step(graphdef, tx, schedule, objective, 1, shardings, batch_sharding(mesh))
    with jax.set_mesh(mesh):
        for i, b in enumerate(batches):
            state, _ = step(state, jax.device_put(b, batch_sharding(mesh)), jax.random.key(i))
    assert state["frozen"]["reference_embed"][...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    np.testing.assert_array_equal(np.asarray(state["frozen"]["reference_embed"][...]), frozen_before)
    assert not np.allclose(np.asarray(state["params"]["policy"]["embed"][...]), params_before)


class NanOnMarkedBatches:
    """Causal LM whose loss is NaN on a batch whose first segment id is -1 (a bad batch)."""

    def __init__(self, cfg):
        self.inner = registry.lookup("objective", "causal_lm")(compose(cfg))

    def loss_fn(self, model, batch, rng):
        loss, aux = self.inner.loss_fn(model, batch, rng)
        return jax.numpy.where(batch["segment_ids"][0, 0] < 0, jax.numpy.nan, loss), aux


@pytest.fixture(scope="module")
def guarded():
    """A compiled step of NanOnMarkedBatches (warmup 2, linear decay, no weight decay), its
    schedule, and a fresh copy of the initial state per call of ``fresh()``."""
    cfg = tiny_config()
    cfg.optimizer.warmup_steps, cfg.optimizer.schedule, cfg.optimizer.weight_decay = 2, "linear", 0.0
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    make_model, _ = model_factory(cfg, vocab_size=256)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    graphdef, state, shardings = init_state(make_model, tx, mesh)
    bsh = batch_sharding(mesh)
    step = compile_train_step(graphdef, tx, schedule, NanOnMarkedBatches(cfg), 1, shardings, bsh)

    def run(batches):
        """Train a copy of the initial state on ``batches``: logged metrics, final state."""
        s, logs = jax.tree.map(jax.numpy.copy, state), []
        with jax.set_mesh(mesh):
            for i, b in enumerate(batches):
                s, metrics = step(s, jax.device_put(b, bsh), jax.random.key(i))
                logs.append({k: float(v) for k, v in metrics.items()})
        return logs, s

    return run, schedule, cfg, jax.tree.map(np.asarray, state["params"])


def test_a_skipped_update_logs_no_rate_and_consumes_no_schedule_step(batches, guarded):
    """The logged lr is the one each update applied (0 for the skipped one); the schedule
    follows the applied updates, so the run with a bad batch ends exactly like the run
    without it (documented in train_step and lmstack.optim)."""
    run, schedule, _, _ = guarded
    bad = {**batches[0], "segment_ids": batches[0]["segment_ids"].copy()}
    bad["segment_ids"][0, 0] = -1
    with_bad, s_bad = run([batches[0], bad, batches[1], batches[2]])
    without, s_good = run(list(batches))
    assert [m["skipped"] for m in with_bad] == [0, 1, 0, 0] and np.isnan(with_bad[1]["loss"])
    applied = [float(schedule(c)) for c in range(3)]  # update counts 0, 1, 2
    np.testing.assert_allclose([m["lr"] for m in with_bad], [applied[0], 0.0, applied[1], applied[2]], rtol=1e-6)
    np.testing.assert_allclose([m["lr"] for m in without], applied, rtol=1e-6)
    assert int(s_bad["step"]) == 4 and int(s_good["step"]) == 3  # batches consumed
    assert int(schedule_count(s_bad["opt_state"])) == int(schedule_count(s_good["opt_state"])) == 3
    for a, b in zip(jax.tree.leaves(s_bad["params"]), jax.tree.leaves(s_good["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_first_update_moves_the_weights(batches, guarded):
    """Warmup starts at lr / (warmup + 1), not 0: after one step the parameters differ from
    their initialisation by Adam's first step, lr_0 * sign(grad), where the gradient is not 0."""
    run, _, cfg, before = guarded
    (metrics,), state = run(batches[:1])
    lr0 = cfg.optimizer.lr / (cfg.optimizer.warmup_steps + 1)
    assert metrics["lr"] == pytest.approx(lr0, rel=1e-6)
    q0, q1 = before["blocks"]["attn"]["q"]["weight"][...], np.asarray(state["params"]["blocks"]["attn"]["q"]["weight"][...])
    np.testing.assert_allclose(np.abs(q1 - q0).max(), lr0, rtol=1e-3)
