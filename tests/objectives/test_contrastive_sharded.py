"""Negatives come from the global batch: on 8 devices the contrastive loss and its gradients
equal the single-device ones on the same global batch."""

import jax
import numpy as np
import pytest
from flax import nnx

from lmstack import registry
from lmstack.configs.base import base_config
from lmstack.objectives.contrastive import stack_pairs
from lmstack.optim import make_optimizer
from lmstack.sharding import batch_sharding, make_mesh
from lmstack.trainstate import init_state, model_factory


def config(loss: str):
    c = base_config()
    c.model.name = "two_tower"
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff = 32, 2, 4, 64
    c.model.share_towers = False
    c.data.seq_len = 12
    c.train.batch_size = 16
    c.objective.name = "contrastive"
    c.objective.loss = loss
    return c


def global_batch(rng, n=16, seq=12, hard_negatives=0):
    def seqs(k):
        return [rng.integers(1, 64, size=rng.integers(3, seq + 1)).astype(np.int32) for _ in range(k)]
    batch = stack_pairs(list(zip(seqs(n), seqs(n))), seq)
    if hard_negatives:
        neg = stack_pairs(list(zip(seqs(n * hard_negatives), seqs(n * hard_negatives))), seq)
        batch["n_tokens"], batch["n_segment_ids"] = neg["b_tokens"], neg["b_segment_ids"]
    return batch


def loss_and_grads_fn(cfg, mesh_shape):
    """A compiled (global batch -> loss, gradients) on a mesh, with the same initial weights."""
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    make_model, _ = model_factory(cfg, vocab_size=64)
    tx, _ = make_optimizer(cfg.optimizer, 10)
    graphdef, state, shardings = init_state(make_model, tx, mesh)
    objective = registry.lookup("objective", "contrastive")(cfg)

    def loss(params, b):
        loss_sum, aux = objective.loss_fn(nnx.merge(graphdef, params, state["frozen"]), b, None)
        return loss_sum / aux["weight"]

    fn = jax.jit(jax.value_and_grad(loss), in_shardings=(shardings["params"], batch_sharding(mesh)))

    def run(batch):
        with jax.set_mesh(mesh):
            value, grads = fn(state["params"], jax.device_put(batch, batch_sharding(mesh)))
        return float(value), [np.asarray(g) for g in jax.tree.leaves(grads)]

    return run


@pytest.mark.parametrize("loss,hard_negatives", [("infonce", 1), ("sigmoid", 0)])
def test_sharded_loss_and_grads_equal_single_device(loss, hard_negatives):
    cfg = config(loss)
    batch = global_batch(np.random.default_rng(0), hard_negatives=hard_negatives)
    single = loss_and_grads_fn(cfg, (1, 1, 1))
    ref_loss, ref_grads = single(batch)
    for shape in [(8, 1, 1), (2, 2, 2)]:
        got_loss, got_grads = loss_and_grads_fn(cfg, shape)(batch)
        np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5, atol=1e-6, err_msg=str(shape))
        for g, r in zip(got_grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6, err_msg=str(shape))
    if loss != "infonce":  # SigLIP starts with bias -10: negatives barely count at init
        return
    # a local-only loss (each of 8 devices' 2 examples as the only negatives) would differ
    local = loss_and_grads_fn(config(loss), (1, 1, 1))
    h = hard_negatives
    per_device = [local({k: v[i * h:(i + 2) * h] if k.startswith("n_") else v[i:i + 2] for k, v in batch.items()})[0]
                  for i in range(0, 16, 2)]
    assert abs(np.mean(per_device) - ref_loss) > 1e-2
