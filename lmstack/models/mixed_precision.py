"""Products whose inputs are in the compute dtype (bfloat16) but whose output is wanted in
float32: the output logits (for a float32 loss) and the attention logits (for a float32
softmax).

``jnp.einsum(..., preferred_element_type=float32)`` accumulates in float32 and keeps the
float32 result, but its gradient is a product of the float32 cotangent with the other
bfloat16 input: a mixed-dtype matmul that XLA runs in float32 (on a GPU, off the bf16
tensor cores). :func:`einsum_f32` rounds the cotangent to the inputs' dtype first, so the
backward matmuls run in bfloat16 like every other, as mixed-precision training does
(PyTorch autocast, MaxText): the cotangent of logits is ``softmax - onehot``-sized, which
bfloat16 holds to 2^-9 relative. In float32 it is the plain einsum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def einsum_f32(spec: str, a: Array, b: Array) -> Array:
    """``einsum(spec, a, b)`` accumulated and returned in float32; a and b share a dtype. With
    low-precision inputs its gradients are matmuls in that dtype (see the module docstring)."""
    if a.dtype == jnp.float32:
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return _einsum_low_precision_grads(spec, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_low_precision_grads(spec: str, a: Array, b: Array) -> Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _forward(spec: str, a: Array, b: Array) -> tuple[Array, tuple[Array, Array]]:
    return _einsum_low_precision_grads(spec, a, b), (a, b)


def _backward(spec: str, inputs: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    a, b = inputs
    # the transposed products of the low-precision einsum (a bf16 GEMM accumulates in float32
    # on GPUs and TPUs); under jit its unused forward product is dropped
    _, vjp = jax.vjp(lambda x, y: jnp.einsum(spec, x, y), a, b)
    return vjp(g.astype(a.dtype))


_einsum_low_precision_grads.defvjp(_forward, _backward)
