"""A tiny decoder with a PEFT method attached, and a few real training steps on it, shared by
the tests of the prompt, prefix, adapter and (IA)^3 methods."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmstack.config import compose
from lmstack.configs.base import base_config
from lmstack.optim import make_optimizer
from lmstack.peft.base import trainable_filter
from lmstack.sharding import batch_sharding, make_mesh
from lmstack.step import compile_train_step
from lmstack.trainstate import init_state, model_factory, peft_method

VOCAB = 64


def tiny_cfg(method: str = "none", **keys):
    """2 layers, d=32, 4 heads of 8, 2 KV heads, d_ff=64; ``peft.name=method`` with ``keys``."""
    c = base_config()
    c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    c.data.seq_len = 8
    c.peft.name = method
    c.peft.update(keys)
    return compose(c)


def build(method: str = "none", **keys):
    """(model, resolved model config) of :func:`tiny_cfg`."""
    make, mcfg = model_factory(tiny_cfg(method, **keys), vocab_size=VOCAB)
    return make(), mcfg


class _LM:
    def loss_fn(self, model, batch, rng):
        t = batch["tokens"]
        logits = model(t[:, :-1], rng=rng)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:])
        return ce.sum(), {"weight": jnp.asarray(ce.size, jnp.float32)}


def train_steps(cfg, n: int = 4, lr: float = 1e-2):
    """``n`` compiled train steps on one fixed batch with the run's trainable set: (state
    before, state after, the loss of every step)."""
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    make, _ = model_factory(cfg, vocab_size=VOCAB)
    cfg.optimizer.update(lr=lr, warmup_steps=0, schedule="constant")
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    graphdef, state, shardings = init_state(make, tx, mesh, trainable_filter(cfg.train, peft_method(cfg.peft)))
    before = jax.device_get(state)
    step = compile_train_step(graphdef, tx, schedule, _LM(), 1, shardings, batch_sharding(mesh))
    batch = {"tokens": jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, (2, 9)), jnp.int32)}
    losses = []
    with jax.set_mesh(mesh):
        for i in range(n):
            state, metrics = step(state, batch, jax.random.key(i))
            losses.append(float(metrics["loss"]))
    return before, jax.device_get(state), losses


def paths(tree) -> list[str]:
    return sorted(".".join(map(str, p)) for p, _ in nnx.to_flat_state(tree))


def assert_only_adapters_train(before, after, losses, expected_paths: list[str]) -> None:
    """The trainable set is exactly ``expected_paths``, every frozen tensor is bit-identical
    after training, every trainable one moved, and the loss went down."""
    assert paths(after["params"]) == expected_paths
    for x, y in zip(jax.tree.leaves(before["frozen"]), jax.tree.leaves(after["frozen"])):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"])):
        assert np.abs(np.asarray(x) - np.asarray(y)).max() > 0
    assert losses[-1] < losses[0]
