"""The train step's flat all-reduce (per-device sums under shard_map, one psum of one buffer):
the same update as the compiler's all-reduce and as one device, dropout included; where it
applies; and the whole batch's dropout masks inside a manual data axis."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lmstack import registry
from lmstack.models.dropout import batch_bernoulli
from lmstack.sharding import batch_sharding, make_mesh
from lmstack.step import flat_allreduce_pays
from tests.helpers import packed_batch, run_steps, tiny_config


def train(cfg, mesh_shape, flat, batches):
    """Losses and final params (numpy) of ``batches`` trained on the mesh, and the compiled step."""
    losses, state, step = run_steps(cfg, mesh_shape, batches, flat_allreduce=flat)
    return np.array(losses), [np.asarray(x) for x in jax.tree.leaves(state["params"])], (step, state)


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(3)
    return [packed_batch(rng, 8, 16) for _ in range(3)]


@pytest.mark.parametrize("microbatches", [1, 2])
def test_flat_allreduce_trains_as_one_device_with_dropout(batches, microbatches):
    cfg = tiny_config("gpt2", microbatches=microbatches)
    cfg.model.dropout = 0.2  # the masks must be the whole batch's on every device
    one, one_params, _ = train(cfg, (1, 1, 1), False, batches)
    gspmd, gspmd_params, _ = train(cfg, (4, 1, 1), False, batches)
    flat, flat_params, _ = train(cfg, (4, 1, 1), True, batches)
    np.testing.assert_allclose(flat, gspmd, rtol=0, atol=1e-6)
    np.testing.assert_allclose(flat, one, rtol=0, atol=1e-5)
    for f, g, o in zip(flat_params, gspmd_params, one_params):
        np.testing.assert_allclose(f, g, rtol=0, atol=1e-6)
        np.testing.assert_allclose(f, o, rtol=0, atol=1e-4)  # Adam magnifies summation order where v ~ 0
    assert not np.allclose(one, train(tiny_config("gpt2", microbatches=microbatches), (1, 1, 1), False, batches)[0])


def _allreduce_operands(step, state, batch) -> list[int]:
    """Operands of each all-reduce in the compiled step's HLO."""
    hlo = step.lower(state, batch, jax.random.key(0)).compile().as_text()
    calls = (re.search(r" all-reduce(?:-start)?\(([^)]*)\)", line) for line in hlo.splitlines())
    return [len(re.findall(r"%[\w.-]+", m.group(1))) for m in calls if m]


def test_one_allreduce_of_one_buffer(batches):
    cfg = tiny_config("gpt2")
    _, _, (flat_step, state) = train(cfg, (4, 1, 1), True, batches[:1])
    _, _, (gspmd_step, state2) = train(cfg, (4, 1, 1), False, batches[:1])
    batch = jax.device_put(batches[0], batch_sharding(make_mesh({"data": 4, "fsdp": 1, "tensor": 1})))
    assert _allreduce_operands(flat_step, state, batch) == [1]
    assert sum(_allreduce_operands(gspmd_step, state2, batch)) > 1


@pytest.mark.parametrize("shape, objective, pays", [
    ((8, 1, 1), "causal_lm", True),
    ((1, 1, 1), "causal_lm", False),  # one device: nothing to reduce
    ((4, 2, 1), "causal_lm", False),  # fsdp-sharded weights would be gathered to be flattened
    ((4, 1, 2), "causal_lm", False),
    ((8, 1, 1), "contrastive", False),  # in-batch negatives: the loss is no sum over rows
])
def test_flat_allreduce_pays_only_where_it_applies(shape, objective, pays):
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
    assert flat_allreduce_pays(mesh, registry.lookup("objective", objective)) is pays


def test_batch_bernoulli_keeps_each_devices_rows_of_the_whole_draw():
    mesh = make_mesh({"data": 4, "fsdp": 1, "tensor": 1})
    key, shape = jax.random.key(11), (8, 5, 3)
    whole = jax.random.bernoulli(key, 0.7, shape)
    local = jax.jit(jax.shard_map(lambda k: batch_bernoulli(k, 0.7, (2, 5, 3)), mesh=mesh, in_specs=P(),
                                  out_specs=P("data"), axis_names={"data"}, check_vma=False))(key)
    np.testing.assert_array_equal(np.asarray(local), np.asarray(whole))
    assert 0.5 < float(whole.mean()) < 0.9
