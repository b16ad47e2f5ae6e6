"""NF4 storage of frozen base weights (QLoRA), in bitsandbytes' format.

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) stores each frozen weight as
4-bit NormalFloat indices with one absmax scale per block of 64 elements, and optionally
quantises those scales again ("double quantisation"). This module follows bitsandbytes
(``bitsandbytes/functional.py`` ``quantize_4bit``/``dequantize_4bit``, ``csrc/kernels.cu``
``kQuantizeBlockwise``/``dQuantizeNF4``, ``bitsandbytes/backends/default/ops.py``):

- Blocks: the weight is flattened row-major and cut into contiguous blocks of ``block_size``
  elements; the last block may be partial (its absmax is over its real elements). The shape is
  kept, so any size is accepted. The order is that of the array as given: to match a
  bitsandbytes checkpoint byte for byte, quantise the HF ``(out_features, in_features)`` layout,
  the transpose of lmstack's ``(in, out)`` projection weights.
- Codes: each element is scaled by ``1 / absmax`` (a float32 reciprocal, then a multiply, as the
  kernel does) and mapped to the NF4 code whose interval holds it: index = number of
  :data:`NF4_THRESHOLDS` strictly below the value, the float32 midpoints of ``dQuantizeNF4``'s
  comparison tree (``x > t``). A value equal to a threshold takes the lower code. The
  default (CPU) backend's ``argmin |x - code|`` agrees except within one float32 ulp of a
  midpoint. An all-zero block scales to NaN and takes code 0 (-1.0 times absmax 0), as in both
  bitsandbytes paths.
- Packing: two 4-bit indices per uint8, the first element of each pair in the HIGH nibble
  (``packed = q[::2] << 4 | q[1::2]`` in ``backends/default/ops.py``; ``qvals[j] =
  dQuantizeNF4(vals[2*j]) << 4 | dQuantizeNF4(vals[2*j+1])`` in ``kernels.cu``). An odd element
  count pads a zero, which fills the last low nibble with code 7 (0.0).
- Double quantisation (bitsandbytes ``compress_statistics=True``): the float32 absmax values
  have their mean subtracted (``nested_offset``), then are quantised blockwise to 8 bits with
  blocks of 256 (``nested_absmax`` holds each block's float32 absmax) and bitsandbytes' signed
  dynamic map :data:`DYNAMIC_CODE`, nearest value by float32 midpoints ``(a + b) * 0.5``
  (``kernels.cu`` ``dQuantize<0>``). Exact ties go to the lower index here; bitsandbytes'
  binary search sends them to whichever neighbour it visited last.
- Dequantisation multiplies code by absmax in float32 and casts to the requested dtype (the
  CUDA kernel; the default backend casts the code table to the dtype first).

Leading ``stack_dims`` axes (the stacked layers axis of lmstack's ``blocks.*`` weights) are
quantised as independent tensors, so every stored array keeps them in front and
``jax.lax.scan``/``nnx.scan`` slice an :class:`NF4Tensor` per layer like the float weight.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lmstack.config import ConfigError

# bitsandbytes functional.get_4bit_type("nf4") (identical in kernels.cu dDequantizeNF4 and
# backends/utils.py _NF4_QUANT_TABLE); QLoRA appendix E.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)

# The comparison constants of bitsandbytes' csrc/kernels.cu dQuantizeNF4, ascending: code k+1
# is chosen over code k when x > NF4_THRESHOLDS[k].
NF4_THRESHOLDS = np.array(
    [
        -0.8480964004993439,
        -0.6106329262256622,
        -0.4599952697753906,
        -0.33967943489551544,
        -0.23460740596055984,
        -0.13791173323988914,
        -0.045525018125772476,
        0.03979014977812767,
        0.1202552504837513,
        0.2035212516784668,
        0.2920137718319893,
        0.3893125355243683,
        0.5016634166240692,
        0.6427869200706482,
        0.8614784181118011,
    ],
    dtype=np.float32,
)

NESTED_BLOCK_SIZE = 256  # bitsandbytes quantize_4bit: quantize_blockwise(absmax, blocksize=256)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32 as ATen's CPU kernel computes it
    (``RangeFactoriesKernel.cpp``): ``step = (end - start) / (steps - 1)``, then ``start + step * i``
    for the first half and ``end - step * (steps - 1 - i)`` for the rest, all in float32."""
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(steps - 1)
    i = np.arange(steps)
    first = start32 + step * i.astype(np.float32)
    last = end32 - step * (steps - 1 - i).astype(np.float32)
    return np.where(i < steps // 2, first, last).astype(np.float32)


def _dynamic_map() -> np.ndarray:
    """bitsandbytes ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``:
    for exponent i = 0..6, the midpoints of ``linspace(0.1, 1, 2**i + 1)`` times ``10**(i - 6)``,
    both signs, plus 0 and 1; 256 sorted float32 values."""
    data = []
    for i in range(7):
        boundaries = _torch_linspace_f32(0.1, 1.0, 2**i + 1)
        means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (i - 6))
        data += [scale * means, -scale * means]
    data.append(np.array([0.0, 1.0], np.float32))
    return np.sort(np.concatenate(data)).astype(np.float32)


# The 8-bit map of the nested (double-quantised) absmax, built by bitsandbytes' construction with
# current torch's float32 CPU linspace (aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp, scalar
# kernel). Old torch builds with a vectorised linspace may differ in the last bit of some entries.
DYNAMIC_CODE = _dynamic_map()
_DYNAMIC_MIDPOINTS = ((DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) * np.float32(0.5)).astype(np.float32)


@struct.dataclass
class NF4Tensor:
    """A weight in NF4 storage; a pytree (arrays are leaves, ``shape``/``block_size`` static).

    With ``S`` the stacked (leading) shape, ``n = prod(shape)`` and ``B = ceil(n / block_size)``:

    - ``data``: uint8 ``S + ((n + 1) // 2,)``, two codes per byte, first in the high nibble.
    - ``absmax``: float32 ``S + (B,)``; with double quantisation uint8 ``S + (B,)``, indices
      into :data:`DYNAMIC_CODE`.
    - ``nested_absmax``: float32 ``S + (ceil(B / 256),)`` (double quantisation only, else None).
    - ``nested_offset``: float32 ``S`` (double quantisation only, else None).
    - ``shape``: the shape of one tensor (without ``S``); ``block_size``: elements per block.

    Field names follow bitsandbytes' ``QuantState`` (``absmax``, ``nested_absmax``,
    ``nested_offset``, ``blocksize``).
    """

    data: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    nested_offset: jax.Array | None
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    block_size: int = struct.field(pytree_node=False)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def stacked_shape(self) -> tuple[int, ...]:
        """The shape :func:`dequantize_nf4` returns: the stacked axes, then ``shape``."""
        return tuple(self.data.shape[:-1]) + tuple(self.shape)


def _check_args(shape: tuple[int, ...], block_size: int, stack_dims: int, name: str) -> None:
    if not (isinstance(block_size, int) and block_size > 0):
        raise ConfigError(
            f"{name}: NF4 block_size must be a positive integer (bitsandbytes uses 64), got {block_size!r}"
        )
    if not 0 <= stack_dims <= len(shape):
        raise ConfigError(
            f"{name}: stack_dims={stack_dims} does not fit a weight of shape {shape}: "
            f"pass 0..{len(shape)} (the number of leading stacked axes)"
        )
    if math.prod(shape[stack_dims:]) == 0:
        raise ConfigError(f"{name}: cannot NF4-quantise an empty tensor of shape {shape}")


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    """``x`` ``(..., n)`` zero-padded at the end and cut into ``(..., ceil(n / block_size), block_size)``."""
    pad = [(0, 0)] * (x.ndim - 1) + [(0, -x.shape[-1] % block_size)]
    return jnp.pad(x, pad).reshape(*x.shape[:-1], -1, block_size)


def _quantize_absmax(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """bitsandbytes' double quantisation of float32 ``absmax`` ``S + (B,)``: returns uint8
    indices ``S + (B,)``, float32 nested absmax ``S + (ceil(B / 256),)`` and offset ``S``."""
    n_blocks = absmax.shape[-1]
    offset = jnp.mean(absmax, axis=-1)
    centred = _blocks(absmax - offset[..., None], NESTED_BLOCK_SIZE)
    nested_absmax = jnp.max(jnp.abs(centred), axis=-1)
    scaled = centred * (jnp.float32(1.0) / nested_absmax)[..., None]
    # index = #midpoints below the value; NaN (a block of equal scales: nested absmax 0) gives
    # index 0 like dQuantize<0>, and dequantises to the offset either way
    q = jnp.sum(scaled[..., None] > jnp.asarray(_DYNAMIC_MIDPOINTS), axis=-1, dtype=jnp.uint8)
    return q.reshape(*absmax.shape[:-1], -1)[..., :n_blocks], nested_absmax, offset


def _dequantize_absmax(q: NF4Tensor) -> jax.Array:
    """float32 absmax ``S + (B,)``: stored, or ``DYNAMIC_CODE[absmax] * nested_absmax + offset``."""
    if not q.double_quant:
        return q.absmax
    n_blocks = q.absmax.shape[-1]
    codes = _blocks(jnp.asarray(DYNAMIC_CODE)[q.absmax.astype(jnp.int32)], NESTED_BLOCK_SIZE)
    absmax = (codes * q.nested_absmax[..., None]).reshape(*q.absmax.shape[:-1], -1)[..., :n_blocks]
    return absmax + q.nested_offset[..., None]


def quantize_nf4(
    w: jax.Array | np.ndarray,
    block_size: int = 64,
    double_quant: bool = False,
    stack_dims: int = 0,
    name: str = "weight",
) -> NF4Tensor:
    """Quantise a float weight to NF4 (bitsandbytes ``quantize_4bit(quant_type="nf4")``).

    ``w``: float32/bfloat16/float16 array, any shape; its first ``stack_dims`` axes are stacked
    tensors quantised independently (1 for lmstack's ``(L, ...)`` block weights). Works under
    ``jax.jit`` (all shapes are static). ``name`` (the parameter path) goes into error messages.
    Raises :class:`ConfigError` for a non-float weight, a bad ``block_size`` or ``stack_dims``,
    or an empty tensor.
    """
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ConfigError(
            f"{name}: NF4 quantises float weights, got dtype {w.dtype}: cast it to float32 or bfloat16 first"
        )
    _check_args(tuple(w.shape), block_size, stack_dims, name)
    return _quantize(w, block_size, double_quant, stack_dims)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(w: jax.Array, block_size: int, double_quant: bool, stack_dims: int) -> NF4Tensor:
    stack, tensor_shape = w.shape[:stack_dims], w.shape[stack_dims:]
    n = math.prod(tensor_shape)
    x = _blocks(w.reshape(*stack, n).astype(jnp.float32), block_size)
    absmax = jnp.max(jnp.abs(x), axis=-1)
    scaled = x * (jnp.float32(1.0) / absmax)[..., None]  # NaN for an all-zero block: code 0
    # index = #thresholds t with scaled > t (dQuantizeNF4's tree); NaN compares False
    idx = jnp.sum(scaled[..., None] > jnp.asarray(NF4_THRESHOLDS), axis=-1, dtype=jnp.uint8)
    idx = idx.reshape(*stack, -1)[..., :n]
    if n % 2:
        idx = jnp.pad(idx, [(0, 0)] * len(stack) + [(0, 1)], constant_values=7)  # the padded 0.0
    packed = (idx[..., 0::2] << 4) | idx[..., 1::2]
    if double_quant:
        absmax, nested_absmax, nested_offset = _quantize_absmax(absmax)
    else:
        nested_absmax = nested_offset = None
    return NF4Tensor(packed, absmax, nested_absmax, nested_offset, tensor_shape, block_size)


def dequantize_nf4(q: NF4Tensor, dtype: jnp.dtype = jnp.bfloat16) -> jax.Array:
    """The float weight of ``q``: shape ``q.stacked_shape``, dtype ``dtype``.

    ``NF4_CODE[index] * absmax`` in float32, then cast (bitsandbytes ``dequantize_4bit``, CUDA
    kernel). Pure jnp: runs under ``jax.jit``, ``vmap`` and ``scan`` (over the stacked axes).
    """
    return _dequantize(q, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(q: NF4Tensor, dtype: jnp.dtype) -> jax.Array:
    n = math.prod(q.shape)
    stack = q.data.shape[:-1]
    idx = jnp.stack([q.data >> 4, q.data & 0xF], axis=-1).reshape(*stack, -1)[..., :n]
    values = _blocks(jnp.asarray(NF4_CODE)[idx.astype(jnp.int32)], q.block_size)
    w = values * _dequantize_absmax(q)[..., None]
    return w.reshape(*stack, -1)[..., :n].reshape(*stack, *q.shape).astype(dtype)


def nf4_bytes(shape: tuple[int, ...], block_size: int = 64, double_quant: bool = False, stack_dims: int = 0) -> int:
    """Bytes :func:`quantize_nf4` stores for a weight of ``shape`` (the sum of the arrays'
    ``nbytes``): per tensor ``ceil(n / 2)`` packed bytes plus 4 bytes of absmax per block, or with
    double quantisation 1 byte per block, 4 per 256 blocks and a 4-byte offset. The code tables
    are module constants, not stored per tensor (bitsandbytes also saves ``quant_map`` and
    ``nested_quant_map`` with each tensor: 64 + 1024 bytes). Raises :class:`ConfigError` as
    :func:`quantize_nf4` does."""
    shape = tuple(shape)
    _check_args(shape, block_size, stack_dims, "shape")
    n = math.prod(shape[stack_dims:])
    n_blocks = -(-n // block_size)
    if double_quant:
        scale_bytes = n_blocks + 4 * -(-n_blocks // NESTED_BLOCK_SIZE) + 4
    else:
        scale_bytes = 4 * n_blocks
    return math.prod(shape[:stack_dims]) * ((n + 1) // 2 + scale_bytes)
