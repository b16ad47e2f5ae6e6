"""model.dtype=bfloat16: float32 master weights and optimizer state, every matmul of the
train step (forward and backward) in bfloat16, logits, softmax and loss in float32."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from lmstack import registry
from lmstack.config import compose
from lmstack.optim import make_optimizer
from lmstack.sharding import batch_sharding, make_mesh
from lmstack.step import compile_train_step
from lmstack.trainstate import init_state, model_factory
from tests.helpers import packed_batch, tiny_config


def dot_operand_dtypes(jaxpr: jcore.Jaxpr, out: list) -> list:
    """(operand dtypes, output dtype) of every dot_general, nested jaxprs (jit, scan, remat,
    custom_vjp) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append((tuple(str(v.aval.dtype) for v in eqn.invars), str(eqn.outvars[0].aval.dtype)))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, jcore.ClosedJaxpr):
                    dot_operand_dtypes(sub.jaxpr, out)
                elif isinstance(sub, jcore.Jaxpr):
                    dot_operand_dtypes(sub, out)
    return out


def two_steps(dtype: str, batches):
    cfg = compose(tiny_config())
    cfg.model.dtype = dtype
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    make_model, _ = model_factory(cfg, vocab_size=256)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    graphdef, state, shardings = init_state(make_model, tx, mesh)
    objective = registry.lookup("objective", cfg.objective.name)(cfg)
    bsh = batch_sharding(mesh)
    step = compile_train_step(graphdef, tx, schedule, objective, 1, shardings, bsh)
    losses = []
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(step)(state, batches[0], jax.random.key(0))
        for b in batches:
            state, metrics = step(state, jax.device_put(b, bsh), jax.random.key(0))
            losses.append(float(metrics["loss"]))
    return np.array(losses), state, jaxpr


def test_bfloat16_step_keeps_float32_state_runs_bfloat16_matmuls_and_tracks_the_float32_loss():
    rng = np.random.default_rng(0)
    batches = [packed_batch(rng, 8, 16) for _ in range(2)]
    ref, ref_state, _ = two_steps("float32", batches)
    got, state, jaxpr = two_steps("bfloat16", batches)
    # master weights and Adam moments stay float32
    for part in ("params", "opt_state"):
        dtypes = {str(x.dtype) for x in jax.tree.leaves(state[part]) if jnp.issubdtype(x.dtype, jnp.floating)}
        assert dtypes == {"float32"}, (part, dtypes)
    # every matmul, backward included, multiplies bfloat16 by bfloat16; the float32 results are
    # the output logits and the attention logits (fed to float32 softmaxes)
    dots = dot_operand_dtypes(jaxpr.jaxpr, [])
    assert {ops for ops, _ in dots} == {("bfloat16", "bfloat16")}, sorted(set(dots))
    assert sum(out == "float32" for _, out in dots) == 2
    # the loss of the same weights on the same batch (first step), and after one update. A
    # bf16 rounding is off by at most 2^-9 (0.2%) relative; the loss (~ln 256 = 5.5) is a
    # log-sum-exp of small logits whose rounding errors mostly cancel, so half of one rounding
    # of the loss itself (1e-3 relative) bounds it (measured here: 3e-6 and 5e-5)
    np.testing.assert_allclose(got, ref, rtol=1e-3)
    assert abs(got[0] - ref[0]) > 0  # the step really ran in another precision
