"""disable_adapters: a model with every method's slots filled (and moved away from their
identity initialisation) computes the base model's logits once its adapters are taken out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack.peft.base import disable_adapters
from lmstack.trainstate import peft_method
from tests.peft.common import VOCAB, build, tiny_cfg

METHODS = {"lora": {}, "ia3": {}, "prompt_tuning": {"num_virtual_tokens": 3}, "prefix_tuning": {"num_virtual_tokens": 3},
           "adapter": {}}


@nnx.jit
def logits(model, tokens):
    return model(tokens)


@pytest.mark.parametrize("method", METHODS)
def test_disabled_adapters_give_the_base_model(method):
    model, _ = build(method, **METHODS[method])
    types = peft_method(tiny_cfg(method, **METHODS[method]).peft).adapter_types
    # move every adapter variable off its initial value (LoRA's B and the adapters' up-projection start at 0)
    graphdef, adapters, rest = nnx.split(model, types, ...)
    keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(adapters))))
    adapters = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), adapters)
    model = nnx.merge(graphdef, adapters, rest)
    base, _ = build("none")
    np.testing.assert_array_equal(  # the method left the base weights as the base model has them
        np.concatenate([np.ravel(v) for v in jax.tree.leaves(nnx.state(base, nnx.Param))]),
        np.concatenate([np.ravel(v) for v in jax.tree.leaves(rest.filter(nnx.Param))]))

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 7)), jnp.int32)
    adapted, expected = np.asarray(logits(model, tokens)), np.asarray(logits(base, tokens))
    assert np.abs(adapted - expected).max() > 1e-3  # the adapters change the output
    disabled = disable_adapters(nnx.merge(*nnx.split(model)), types)
    assert not nnx.state(disabled, types)  # no adapter variable left
    np.testing.assert_allclose(np.asarray(logits(disabled, tokens)), expected, rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(logits(model, tokens)) - adapted).max() == 0  # the original keeps its adapters
