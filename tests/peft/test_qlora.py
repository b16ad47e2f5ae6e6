"""QLoRA: LoRA on a base stored as NF4 and dequantised on the fly."""

import jax
import numpy as np
from flax import nnx

from lmstack.models.projection import QuantizedWeight
from lmstack.peft.lora import projections
from lmstack.peft.nf4 import dequantize_nf4
from tests.peft.test_lora import TOKENS, _train_steps, build, tiny_cfg


def _qlora(**keys):
    return build(**{"r": 4, **keys}, name="qlora")


def test_qlora_forward_is_lora_on_the_dequantised_base():
    q_model, _ = _qlora(double_quant=True)
    l_model, _ = build(r=4)
    quantized = {p: m for p, m in projections(q_model)}
    assert all(isinstance(m.weight, QuantizedWeight) for m in quantized.values())
    for path, proj in projections(l_model):  # same seed: the same float init, then quantised
        proj.weight[...] = dequantize_nf4(quantized[path].weight.get_value(), np.float32)
    rng = np.random.default_rng(0)
    for (_, a), (_, b) in zip(projections(q_model), projections(l_model)):
        if a.lora_b is not None:
            a.lora_b[...] = b.lora_b[...] = rng.normal(scale=0.1, size=a.lora_b.shape).astype(np.float32)
    np.testing.assert_allclose(np.asarray(q_model(TOKENS)), np.asarray(l_model(TOKENS)), rtol=1e-5, atol=1e-6)


def test_nf4_base_weights_take_under_30_percent_of_bf16():
    for double_quant, ratio in ((False, 4.5 / 16), (True, None)):
        model, _ = _qlora(double_quant=double_quant)
        stored = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, QuantizedWeight)))
        n = sum(np.prod(m.weight_shape) for _, m in projections(model))
        assert stored / (2 * n) <= 0.30
        if ratio is not None:  # 4 bits + one float32 scale per 64 elements
            assert stored / (2 * n) == ratio


def test_qlora_trains_the_adapters_and_never_touches_the_nf4_base():
    c = tiny_cfg(r=4, target_modules="q,v")
    c.peft.name = "qlora"
    before, after, _ = _train_steps(c, n=2)
    assert all("lora" in k for k in after["params"]["blocks"]["attn"]["q"])
    for x, y in zip(jax.tree.leaves(before["frozen"]), jax.tree.leaves(after["frozen"])):
        np.testing.assert_array_equal(x, y)
    assert np.abs(after["params"]["blocks"]["attn"]["v"]["lora_b"][...]).max() > 0


def test_parameter_count_counts_nf4_weights_at_their_size():
    from lmstack.trainstate import param_count, trainable_count

    counts = []
    for model in (_qlora(double_quant=True)[0], build(r=4)[0]):
        state = {"params": nnx.state(model, nnx.LoRAParam), "frozen": nnx.state(model, nnx.Not(nnx.LoRAParam))}
        counts.append((param_count(state), trainable_count(state)))
    assert counts[0] == counts[1]
    model = build()[0]  # no adapters: every parameter of the decoder
    assert counts[0][0] == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) + counts[0][1]
