"""The projection module: every weight a model multiplies activations by.

``Projection`` holds ``weight`` (``(*in, *out)`` float32, logical axis names), an optional
``bias`` (``(*out,)``) and the compute dtype, and is the one place where parameter-efficient
methods plug in: a LoRA pair (``lora_a`` ``(*in, r)``, ``lora_b`` ``(r, *out)``, both
``nnx.LoRAParam``, added by :func:`lmstack.peft.lora.apply_lora`) and (IA)^3 scaling vectors
(``ia3_in``, ``ia3_out``, added by :func:`lmstack.peft.ia3.apply_ia3`). Families call
``proj(x)``; none reads a weight matrix itself, so a method attached here reaches every
family at once. QLoRA replaces ``weight`` by a :class:`QuantizedWeight` (NF4 storage,
dequantised on the fly). Inside a stacked (scanned) block every variable carries a leading
``layers`` axis outside the scan and none inside it.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lmstack.models.dropout import dropout
from lmstack.models.mixed_precision import einsum_f32
from lmstack.peft.nf4 import NF4Tensor, dequantize_nf4

Array = jax.Array


class QuantizedWeight(nnx.Variable):
    """A frozen base weight stored as an :class:`~lmstack.peft.nf4.NF4Tensor` (QLoRA): not an
    ``nnx.Param``, so never trainable; dequantised to the compute dtype where it is used."""


def param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], std: float) -> nnx.Param:
    """A float32 parameter drawn from N(0, std^2) (as GPT-2 and Llama initialise), with logical names."""
    init = nnx.initializers.normal(stddev=std) if std > 0 else nnx.initializers.zeros
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names)


def zeros_param(shape: tuple[int, ...], names: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.float32), out_sharding=names)


def dense(x: Array, w: Array, out_dtype: jnp.dtype | None = None, n_in: int = 1) -> Array:
    """``x[..., *in] @ w[*in, *out]`` over the last ``n_in`` axes of ``x``, as one 2-D matmul
    (``out_dtype`` float32: accumulated and kept in float32, :func:`einsum_f32`).
    Folding the leading dims into one keeps XLA:CPU on its GEMM path in the backward pass,
    where a 3-D dot fused with an elementwise producer otherwise runs several times slower."""
    in_shape = x.shape[x.ndim - n_in:]
    k = math.prod(in_shape)
    out = w.shape[n_in:]
    x2, w2 = x.reshape(-1, k), w.reshape(k, -1)
    if out_dtype is not None and jnp.dtype(out_dtype) == jnp.float32 and x2.dtype != jnp.float32:
        y = einsum_f32("mk,kn->mn", x2, w2)  # e.g. bf16 logits kept in float32, with bf16 gradients
    else:
        y = jnp.matmul(x2, w2, preferred_element_type=out_dtype)
    return y.reshape(*x.shape[: x.ndim - n_in], *out)


def adapter_key(rng: Array | None) -> Array | None:
    """The key a block hands its attention and MLP for adapter dropout, kept apart from the
    residual-dropout key it was derived from (None stays None: deterministic)."""
    return None if rng is None else jax.random.fold_in(rng, 1)


class IA3Param(nnx.Param):
    """An (IA)^3 scaling vector (:mod:`lmstack.peft.ia3`): ``ia3_out`` ``(*out,)`` scales a
    projection's output, ``ia3_in`` ``(*in,)`` its input (PEFT ``feedforward_modules``)."""


class Projection(nnx.Module):
    """``y[..., *out] = x[..., *in] @ weight (+ bias)`` in the compute dtype, plus the LoRA
    update ``scaling * dropout(x) @ lora_a @ lora_b`` when one is attached; (IA)^3 multiplies
    ``x`` by ``ia3_in`` and ``y`` by ``ia3_out`` when set.

    ``names`` are the logical axis names of ``weight`` (in axes, then out axes);
    ``bias_names`` those of the bias (default: the out axes' names). ``std`` is the
    initialiser's standard deviation (0: zeros).
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], names: Sequence[str], *, std: float,
                 rngs: nnx.Rngs, dtype: str | jnp.dtype = "float32", bias: bool = False,
                 bias_names: Sequence[str] | None = None):
        in_shape, out_shape, names = tuple(in_shape), tuple(out_shape), tuple(names)
        self.weight = param(rngs, in_shape + out_shape, names, std)
        self.bias = zeros_param(out_shape, tuple(bias_names or names[len(in_shape):])) if bias else None
        self.n_in = len(in_shape)
        self.n_out = len(out_shape)
        self.dtype = jnp.dtype(dtype)
        self.lora_a: nnx.LoRAParam | None = nnx.data(None)  # data: LoRA assigns a variable later
        self.lora_b: nnx.LoRAParam | None = nnx.data(None)
        self.lora_scaling = 0.0
        self.lora_dropout = 0.0
        self.lora_merged = False  # True while the update sits inside ``weight`` (lmstack.peft.lora.merge_lora)
        self.ia3_in: IA3Param | None = nnx.data(None)  # (IA)^3 scales, set by lmstack.peft.ia3.apply_ia3
        self.ia3_out: IA3Param | None = nnx.data(None)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The (stacked) float weight's shape, also when it is stored quantised."""
        w = self.weight.get_value()
        return w.stacked_shape if isinstance(w, NF4Tensor) else tuple(w.shape)

    @property
    def in_shape(self) -> tuple[int, ...]:
        w = self.weight_shape
        return w[len(w) - self.n_in - self.n_out: len(w) - self.n_out]

    @property
    def out_shape(self) -> tuple[int, ...]:
        w = self.weight_shape
        return w[len(w) - self.n_out:]

    def dense_weight(self, dtype: jnp.dtype) -> Array:
        """The weight in ``dtype`` (dequantised if stored as NF4)."""
        w = self.weight.get_value()
        return dequantize_nf4(w, dtype) if isinstance(w, NF4Tensor) else w.astype(dtype)

    def __call__(self, x: Array, *, rng: Array | None = None, out_dtype: jnp.dtype | None = None) -> Array:
        dt = self.dtype
        x = x.astype(dt)
        if self.ia3_in is not None:
            x = x * self.ia3_in[...].astype(dt)
        y = dense(x, self.dense_weight(dt), out_dtype, self.n_in)
        if self.lora_a is not None and not self.lora_merged:
            y = y + self.lora_delta(x, rng).astype(y.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        if self.ia3_out is not None:  # after the bias, as PEFT's IA3 Linear scales base_layer(x)
            y = y * self.ia3_out[...].astype(y.dtype)
        return y

    def lora_delta(self, x: Array, rng: Array | None) -> Array:
        """``scaling * dropout(x) @ A @ B`` (PEFT ``lora.Linear.forward``: dropout on the
        input of A only, while training)."""
        h = dense(dropout(x, self.lora_dropout, rng), self.lora_a[...].astype(self.dtype), None, self.n_in)
        return self.lora_scaling * dense(h, self.lora_b[...].astype(self.dtype), None, 1)
