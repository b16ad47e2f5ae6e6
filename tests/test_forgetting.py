"""Continued pre-training against forgetting: L2-SP and EWC penalties against their formulas,
the per-example Fisher against a loop over examples, replay rows (count, determinism, resume),
the config checks, and a parent -> child run whose eval.forgetting starts at the parent's own
perplexity, in training and from `lmstack eval`."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lmstack.config import ConfigError, compose, configure
from lmstack.data.pipeline import TokenStream, train_iterator
from lmstack.data.replay import replay_iterator, replay_rows
from lmstack.evaluate import evaluate
from lmstack.forgetting.fisher import fisher_diagonal
from lmstack.forgetting.penalties import EWC, ewc_penalty, l2sp_penalty
from lmstack.objectives.causal_lm import CausalLM
from lmstack.peft.base import NoPeft, trainable_filter
from lmstack.run import Run
from lmstack.sharding import make_mesh
from lmstack.step import train_step
from lmstack.train import train
from lmstack.trainstate import model_factory
from tests.helpers import corpus_text, packed_batch, text_config, tiny_config

# ----------------------------------------------------------------------------- penalties


def randomized(state: nnx.State, seed: int, positive: bool = False, scale: float = 1.0) -> nnx.State:
    """``state`` (arrays or shapes) with every leaf drawn from N(0, scale^2) (``positive``: its absolute value)."""
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    new = [scale * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
    return jax.tree.unflatten(treedef, [jnp.asarray(np.abs(x) if positive else x) for x in new])


def tiny_model(frozen: str = ""):
    """A 2-layer d=32 decoder with EWC's anchors and Fisher attached to its trainable set, its
    parameters drawn at random (shapes from nnx.eval_shape: initialising on the CPU costs seconds)."""
    c = tiny_config()
    c.model.d_model, c.model.n_heads, c.model.n_kv_heads, c.model.d_ff, c.model.vocab_size = 32, 4, 2, 64, 64
    c.train.frozen = frozen
    make, _ = model_factory(c, vocab_size=64)
    trainable = trainable_filter(c.train, NoPeft)

    def make_with_extras():
        model = make()
        EWC.attach(model, trainable)
        return model

    graphdef, params, rest = nnx.split(nnx.eval_shape(make_with_extras), trainable, ...)
    return c, graphdef, randomized(params, 10, scale=0.2), randomized(rest, 11)


def with_extras(rest: nnx.State, seed: int) -> nnx.State:
    """``rest`` with random anchors and random positive Fisher values."""
    out = nnx.State(dict(rest))
    out["anchor"] = randomized(rest["anchor"], seed)
    out["fisher"] = randomized(rest["fisher"], seed + 1, positive=True)
    return out


def flat_np(state: nnx.State) -> dict[tuple, np.ndarray]:
    return {p: np.asarray(v.get_value(), np.float64) for p, v in nnx.to_flat_state(state)}


def test_penalties_equal_their_formulas_over_the_trainable_set_only():
    _, _, params, rest = tiny_model(frozen="embed")
    assert ("embed",) not in flat_np(params) and ("embed",) not in flat_np(rest["anchor"])
    params, frozen = randomized(params, 0), with_extras(rest, 1)
    theta, theta0, fisher = flat_np(params), flat_np(frozen["anchor"]), flat_np(frozen["fisher"])
    assert theta.keys() == theta0.keys() == fisher.keys() and len(theta) > 5
    l2 = 0.5 * 0.3 * sum(np.sum((theta[k] - theta0[k]) ** 2) for k in theta)  # Li et al. 2018, eq. (3) first term
    ewc = 0.5 * 7.0 * sum(np.sum(fisher[k] * (theta[k] - theta0[k]) ** 2) for k in theta)  # Kirkpatrick et al. eq. (3)
    l2sp = jax.jit(functools.partial(l2sp_penalty, alpha=0.3))
    np.testing.assert_allclose(float(l2sp(params, frozen)), l2, rtol=1e-5)
    np.testing.assert_allclose(float(jax.jit(functools.partial(ewc_penalty, ewc_lambda=7.0))(params, frozen)), ewc,
                               rtol=1e-5)
    assert float(l2sp(frozen["anchor"], frozen)) == 0.0  # at theta_0


def test_penalty_gradients_point_towards_the_anchors():
    _, _, params, rest = tiny_model()
    params, frozen = randomized(params, 2), with_extras(rest, 3)
    theta, theta0, fisher = flat_np(params), flat_np(frozen["anchor"]), flat_np(frozen["fisher"])
    l2sp = functools.partial(l2sp_penalty, alpha=0.5)
    g_l2 = flat_np(jax.jit(jax.grad(l2sp))(params, frozen))
    g_ewc = flat_np(jax.jit(jax.grad(functools.partial(ewc_penalty, ewc_lambda=2.0)))(params, frozen))
    for k in theta:
        np.testing.assert_allclose(g_l2[k], 0.5 * (theta[k] - theta0[k]), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(g_ewc[k], 2.0 * fisher[k] * (theta[k] - theta0[k]), rtol=1e-5, atol=1e-7)
        for g in (g_l2[k], g_ewc[k]):  # a descent step moves every parameter towards theta_0
            assert np.sum(-g * (theta0[k] - theta[k])) > 0
    stepped = jax.jit(lambda p, fr: jax.tree.map(lambda a, g: a - 0.1 * g, p, jax.grad(l2sp)(p, fr)))(params, frozen)
    assert float(jax.jit(l2sp)(stepped, frozen)) < float(jax.jit(l2sp)(params, frozen))


def test_fisher_is_the_mean_of_per_example_squared_gradients():
    cfg, graphdef, params, rest = tiny_model()
    objective = CausalLM(compose(cfg))
    rng = np.random.default_rng(0)
    batches = [packed_batch(rng, 3, 8, vocab=64) for _ in range(2)]
    fisher = flat_np(fisher_diagonal(graphdef, objective, params, rest, batches))

    def example_loss(p, example):  # one example at a time: the textbook estimator
        loss_sum, aux = objective.loss_fn(nnx.merge(graphdef, p, rest), example, None)
        return loss_sum / aux["weight"]

    squared_grad = jax.jit(lambda p, ex: jax.tree.map(jnp.square, jax.grad(example_loss)(p, ex)))
    squares = [flat_np(squared_grad(params, {k: v[r:r + 1] for k, v in b.items()})) for b in batches for r in range(3)]
    for k, f in fisher.items():
        ref = np.mean([s[k] for s in squares], axis=0)
        np.testing.assert_allclose(f, ref, rtol=2e-4, atol=1e-6 * ref.max())


# ----------------------------------------------------------------------------- replay


@pytest.mark.parametrize("batch_size", [1, 3, 8, 12, 16])
def test_replay_rows_are_round_fraction_of_the_batch_evenly_spread(batch_size):
    for fraction in (0.0, 0.1, 0.25, 0.5, 0.7, 0.99):
        rows = replay_rows(batch_size, fraction)
        assert rows.sum() == round(fraction * batch_size)
    assert np.flatnonzero(replay_rows(8, 0.25)).tolist() == [3, 7]  # one in each half: every microbatch of 2


def streams():
    own = TokenStream((np.arange(3000) % 100).astype(np.int32), np.array([0, 1000], np.int64))
    parent = TokenStream((100 + np.arange(2000) % 50).astype(np.int32), np.array([0], np.int64))
    return own, parent


def test_replay_batches_mix_the_parent_stream_deterministically_and_resume_exactly():
    own, parent = streams()
    kw = dict(fraction=0.3, seq_len=16, batch_size=10, seed=5)
    it, plain = replay_iterator(own, parent, **kw), train_iterator(own, seq_len=16, batch_size=10, seed=5)
    mask = replay_rows(10, 0.3)
    batches = [next(it) for _ in range(4)]
    for b in batches:
        plain_b = next(plain)
        assert (b["tokens"][mask] >= 100).all() and (b["tokens"][~mask] < 100).all()  # exactly 3 parent rows
        for k in b:  # the run's rows are train_iterator's own rows
            np.testing.assert_array_equal(b[k][~mask], plain_b[k][~mask])
    again = [next(replay_iterator(own, parent, **kw)) for _ in range(1)]
    np.testing.assert_array_equal(again[0]["tokens"], batches[0]["tokens"])
    other = next(replay_iterator(own, parent, **{**kw, "seed": 6}))
    assert not np.array_equal(other["tokens"][mask], batches[0]["tokens"][mask])
    # resume: the state after two batches gives the third and fourth again
    it2 = replay_iterator(own, parent, **kw)
    next(it2), next(it2)
    state = it2.get_state()
    resumed = replay_iterator(own, parent, **kw)
    resumed.set_state(state)
    for b in batches[2:]:
        np.testing.assert_array_equal(next(resumed)["tokens"], b["tokens"])
    # one process's rows are those rows of the whole batch
    part = next(replay_iterator(own, parent, **kw, rows=slice(5, 10)))
    np.testing.assert_array_equal(part["tokens"], batches[0]["tokens"][5:10])


# ----------------------------------------------------------------------------- config checks


def problems(**overrides) -> str:
    cfg = tiny_config()
    with pytest.raises(ConfigError) as e:
        configure(cfg, [f"--config.{k}={v}" for k, v in overrides.items()], "test", "test")
    return str(e.value)


def test_config_errors_name_the_setting_and_the_fix():
    assert ("replay.fraction=0.25 needs the parent's data, but init.from is scratch and init.data_source is "
            "empty: set --config.init.from=WORKDIR (a run; its own data is used) or "
            "--config.init.data_source=NAME (with --config.init.data_path=PATH)") in problems(**{"replay.fraction": 0.25})
    assert ("replay.fraction=0.05 of train.batch_size=8 rounds to 0 replay rows: pick a fraction giving 1 to 7 rows "
            "(e.g. 0.125)") in problems(**{"replay.fraction": 0.05})
    assert "replay.fraction is 1.0: must be in [0, 1)" in problems(**{"replay.fraction": 1.0})
    msg = problems(**{"replay.fraction": 0.25, "init.data_source": "stdlib", "objective.name": "span_corruption",
                      "model.name": "encoder_decoder"})
    assert ("replay.fraction=0.25 draws windows of the parent's token stream, which fit objectives trained on "
            "windows (e.g. causal_lm), not objective.name=span_corruption, whose batches are built otherwise") in msg
    assert "regularization.fisher_batches=0 must be a positive int" in problems(
        **{"regularization.name": "ewc", "regularization.fisher_batches": 0, "init.data_source": "stdlib"})
    assert "eval.forgetting needs the parent's data" in problems(**{"eval.names": "('perplexity', 'forgetting')"})
    assert "regularization.l2sp has no key 'ewc_lambda'" in problems(
        **{"regularization.name": "l2sp", "regularization.ewc_lambda": 1.0})


# ----------------------------------------------------------------------------- parent -> child


def config(data: Path, **train_keys):
    cfg = text_config(data, **train_keys)
    cfg.checkpoint.every, cfg.eval.batches, cfg.sample.max_new_tokens = 2, 2, 1
    return cfg


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    root = tmp_path_factory.mktemp("forgetting")
    (root / "code.txt").write_text("def f(x):\n    return x + 1\n\n" * 200)
    (root / "play.txt").write_text(corpus_text(6000))
    parent = train(config(root / "code.txt"), root / "parent")
    cfg = config(root / "play.txt")
    cfg.init["from"] = str(root / "parent")
    cfg.replay.fraction = 0.25
    cfg.regularization.name = "ewc"
    cfg.eval.names = ("perplexity", "forgetting")
    cfg = compose(cfg)
    cfg.regularization.fisher_batches, cfg.regularization.fisher_batch_size = 2, 4
    child = train(cfg, root / "child")
    return root, parent, cfg, child


def test_forgetting_starts_at_the_parents_own_perplexity(lineage):
    root, parent, cfg, child = lineage
    ev = child["eval"]
    # the same held-out batches of the parent's data (its config.json), scored with the init.from weights
    assert ev["forgetting/parent_ppl_before"] == pytest.approx(parent["eval"]["perplexity"], rel=1e-6)
    assert ev["forgetting/parent_loss_before"] == pytest.approx(parent["eval"]["loss"], rel=1e-6)
    assert ev["forgetting/ratio"] == pytest.approx(ev["forgetting/parent_ppl_now"] / ev["forgetting/parent_ppl_before"])
    assert ev["forgetting/parent_ppl_now"] == pytest.approx(math.exp(ev["forgetting/parent_loss_now"]), rel=1e-6)
    # `lmstack eval` on the child's checkpoint gives the same figures
    record = evaluate(cfg, root / "child")
    for k in ("parent_ppl_before", "parent_ppl_now", "ratio"):
        assert record[f"forgetting/{k}"] == pytest.approx(ev[f"forgetting/{k}"], rel=1e-5)


def test_anchors_and_fisher_are_checkpointed_frozen_state(lineage):
    root, _, cfg, _ = lineage
    parent_params = jax.device_get(Run.open(root / "parent").restore()["params"])
    child = Run.open(root / "child", cfg)
    state = jax.device_get(child.restore())
    anchors, theta0 = flat_np(state["frozen"]["anchor"]), flat_np(parent_params)
    assert anchors.keys() == theta0.keys()
    for k in anchors:
        np.testing.assert_array_equal(anchors[k], theta0[k])
    fisher = flat_np(state["frozen"]["fisher"])
    assert fisher.keys() == flat_np(state["params"]).keys()
    assert all((f >= 0).all() for f in fisher.values()) and sum(f.sum() for f in fisher.values()) > 0
    from lmstack.metrics_log import read_metrics

    penalty = {r["step"]: r["train/penalty"] for r in read_metrics(root / "child") if "train/penalty" in r}
    assert penalty[1] == 0.0 and penalty[2] > 0.0  # theta = theta_0 before the first update only


def test_the_penalty_enters_the_train_step_exactly_for_any_microbatch_count():
    cfg, graphdef, params, rest = tiny_model()
    cfg = compose(cfg)
    schedule = optax.constant_schedule(0.1)
    tx = optax.chain(optax.scale_by_schedule(schedule), optax.scale(-1.0))  # SGD with lmstack's schedule count
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": rest, "opt_state": tx.init(params)}
    batch = packed_batch(np.random.default_rng(1), 4, 8, vocab=64)
    penalty = functools.partial(l2sp_penalty, alpha=0.05)
    out = {}
    for n in (1, 2):
        fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                                       objective=CausalLM(cfg), microbatches=n, penalty=penalty))
        with jax.set_mesh(make_mesh({"data": 1, "fsdp": 1, "tensor": 1})):  # the step pins microbatch shardings
            out[n] = jax.device_get(fn(dict(state), batch, jax.random.key(0)))
    (s1, m1), (s2, m2) = out[1], out[2]
    assert m1["penalty"] == pytest.approx(float(jax.jit(penalty)(params, rest)), rel=1e-6)
    assert m2["penalty"] == pytest.approx(m1["penalty"], rel=1e-6) and m1["penalty"] > 0
    a, b = flat_np(s1["params"]), flat_np(s2["params"])
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
