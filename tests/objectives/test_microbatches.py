"""Gradient accumulation is exact for every objective: the same global batch split into 1,
2 or 4 microbatches trains on the same tokens with the same loss, gradient norm and
updated parameters (randomness that shapes a batch is drawn per example in the pipeline)."""

import jax
import numpy as np
import pytest

from lmstack import registry
from lmstack.config import ConfigError, load_config
from lmstack.objectives.base import microbatch_problems
from lmstack.optim import make_optimizer
from lmstack.sharding import batch_sharding, make_mesh
from lmstack.step import compile_train_step
from lmstack.trainstate import init_state, model_factory
from tests.objectives.builders import build_objective, documents_data, smoke_config

EXPERIMENTS = ["causal_lm", "prefix_lm", "bert_mlm", "t5_span_corruption", "ul2", "bart_denoising"]


@pytest.fixture(scope="module")
def data():
    return documents_data()


def train_two_steps(experiment, data, microbatch_counts):
    """{microbatches: (logged metrics of two steps, final parameters)} from one initial state."""
    cfg = smoke_config(experiment)
    cfg.model.scan_unroll = 1  # compiles faster; the computation is the same
    objective = build_objective(cfg)
    it = objective.train_batches(data)
    batches = [next(it) for _ in range(2)]
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    make_model, _ = model_factory(cfg, vocab_size=cfg.model.vocab_size)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    graphdef, init, shardings = init_state(make_model, tx, mesh)
    bsh = batch_sharding(mesh)
    out = {}
    for n in microbatch_counts:
        step = compile_train_step(graphdef, tx, schedule, objective, n, shardings, bsh)
        state, logs = jax.tree.map(jax.numpy.copy, init), []
        with jax.set_mesh(mesh):
            for i, b in enumerate(batches):
                state, metrics = step(state, jax.device_put(b, bsh), jax.random.key(i))
                logs.append({k: float(v) for k, v in metrics.items()})
        out[n] = logs, jax.tree.leaves(jax.tree.map(np.asarray, state["params"]))
    return out


@pytest.mark.slow  # three train-step compiles per objective: ~15 s each on 2 CPU cores
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_microbatches_train_exactly_the_full_batch(experiment, data):
    runs = train_two_steps(experiment, data, (1, 2, 4))
    full, full_params = runs[1]
    assert all(m["skipped"] == 0 and m["tokens"] > 0 for m in full)
    for n in (2, 4):
        logs, params = runs[n]
        assert [m["tokens"] for m in logs] == [m["tokens"] for m in full], n
        np.testing.assert_allclose([m["loss"] for m in logs], [m["loss"] for m in full], rtol=0, atol=1e-5)
        np.testing.assert_allclose([m["grad_norm"] for m in logs], [m["grad_norm"] for m in full], rtol=1e-5)
        for a, b in zip(params, full_params):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_in_batch_negatives_refuse_microbatches():
    contrastive = registry.lookup("objective", "contrastive")
    assert contrastive.exact_microbatches is False
    assert all(registry.lookup("objective", n).exact_microbatches for n in
               ("causal_lm", "prefix_lm", "mlm", "span_corruption", "ul2", "denoising"))
    assert microbatch_problems(contrastive, "contrastive", 1) == []
    with pytest.raises(ConfigError) as e:
        load_config("code_search_contrastive:smoke=True", ["--config.train.microbatches=2"])
    assert str(e.value) == (
        "invalid config 'code_search_contrastive:smoke=True': train.microbatches=2: objective.name=contrastive "
        "compares the examples of a batch with each other (in-batch negatives), so a split batch trains on a "
        "different loss: set --config.train.microbatches=1 (from --config.train.microbatches=2)")
