"""Several adapters on one base: a mixed batch equals each row alone with its adapter, and a
weighted combination is exactly the weighted sum of the updates."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmstack.peft.lora import delta_weight, projections
from lmstack.peft.multi import adapter_of, combine_adapters, mixed_logits, set_adapter, stack_adapters
from tests.peft.test_lora import TOKENS, build


def random_adapters(model, n, seed):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda x: jnp.asarray(rng.normal(scale=0.2, size=x.shape), jnp.float32), adapter_of(model))
            for _ in range(n)]


def test_a_mixed_batch_equals_each_row_alone_with_its_adapter():
    model, _ = build(r=4, target_modules="q,v,down")
    adapters = random_adapters(model, 3, seed=0)
    tokens = jnp.concatenate([TOKENS, TOKENS[::-1]])  # 4 rows
    ids = jnp.asarray([2, 0, 1, 2])
    got = np.asarray(jax.jit(lambda a, i, t: mixed_logits(model, a, i, t))(stack_adapters(adapters), ids, tokens))
    for row, i in enumerate([2, 0, 1, 2]):
        set_adapter(model, adapters[i])
        alone = np.asarray(model(tokens[row:row + 1]))[0]
        np.testing.assert_allclose(got[row], alone, rtol=1e-5, atol=1e-5)
    assert np.abs(got[0] - got[1]).max() > 1e-3  # the adapters really differ


def test_combined_adapter_is_the_weighted_sum_of_the_updates():
    small, _ = build(r=4, alpha=8.0, target_modules="q,v")
    a1, a2 = random_adapters(small, 2, seed=1)
    deltas = []
    for a in (a1, a2):
        set_adapter(small, a)
        deltas.append({p: np.asarray(delta_weight(m)) for p, m in projections(small) if m.lora_a is not None})
    big, _ = build(r=8, alpha=16.0, target_modules="q,v")  # rank 4 + 4, the same scaling alpha / r = 2
    set_adapter(big, combine_adapters([a1, a2], [0.7, 0.3]))
    for path, proj in projections(big):
        if proj.lora_a is not None:
            want = 0.7 * deltas[0][path] + 0.3 * deltas[1][path]
            np.testing.assert_allclose(np.asarray(delta_weight(proj)), want, rtol=1e-5, atol=1e-6)
    assert jax.tree.leaves(nnx.state(big, nnx.LoRAParam))[0].shape[-1] == 8
