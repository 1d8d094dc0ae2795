"""`jact.quantize` and `jact.dequantize`: the codec, run by the fused Pallas kernels or the reference.

Both implementations produce the same bits (`jact.kernels` shares its arithmetic with
`jact.codec`), so the choice is one of speed and memory only. Pallas is imported only when a
kernel is chosen: on a CPU-only machine `import jact` never loads it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jact import codec
from jact.codec import QuantizedArray

KERNELS = ("auto", "pallas", "xla")


def quantize(x: jax.Array, bits: int = 2, group_size: int = 256, rounding: str = "stochastic",
             seed: int | jax.Array = 0, kernel: str = "auto") -> QuantizedArray:
  """Compresses a float array to `bits` per value.

  Args:
    x: float16, bfloat16, float32 or float64 array of any shape.
    bits: 1, 2, 4 or 8 (quantised and packed), 16 (stored as bfloat16) or 32 (kept as is).
    group_size: elements sharing one (lo, hi) pair; a positive multiple of 64.
    rounding: "stochastic" (unbiased: the expected decoded value is x) or "nearest" (half the
      error, biased).
    seed: int or uint32 scalar (may be traced) selecting the stochastic rounding noise. The same
      seed and input give bitwise identical codes; different seeds give independent noise.
    kernel: "auto" (the fused Pallas kernel on GPU, the jax.numpy reference elsewhere), "pallas"
      (Pallas everywhere, interpreted off GPU; float16/bfloat16/float32, power-of-two group
      sizes) or "xla" (the reference). All produce the same bits.

  Returns:
    A `QuantizedArray` whose `nbytes` is `n * bits / 8` plus 4 bytes per group.
  """
  kernel = check_kernel(kernel)
  x = jnp.asarray(x)
  dtype = codec.check_float_dtype(x.dtype)
  bits = codec.check_bits(bits)
  group_size = codec.check_group_size(group_size)
  rounding = codec.check_rounding(rounding)
  if bits in codec.PACKED_BITS and _use_pallas(kernel, dtype, bits, group_size):
    from jact import kernels
    return kernels.quantize_pallas(x, bits, group_size, rounding, seed)
  return codec.quantize(x, bits, group_size, rounding, seed)


def dequantize(q: QuantizedArray, kernel: str = "auto") -> jax.Array:
  """Restores an array of `q.shape` and `q.dtype` from a `QuantizedArray`.

  `kernel` chooses the implementation as in `quantize`; any of them decodes any codes.

  Leading axes that the leaves carry beyond the stored layout (from `vmap` over `quantize`) are
  treated as batch axes and kept in front.
  """
  kernel = check_kernel(kernel)
  if not isinstance(q, QuantizedArray):
    raise TypeError(f"dequantize expects a jact.QuantizedArray, got {type(q).__name__}.")
  if q.bits in codec.PACKED_BITS and _use_pallas(kernel, q.dtype, q.bits, q.group_size):
    from jact import kernels
    return kernels.dequantize_pallas(q)
  return codec.dequantize(q)


def check_kernel(kernel: Any) -> str:
  """Returns `kernel`, or raises a ValueError naming the accepted implementations."""
  if kernel not in KERNELS:
    raise ValueError(f"kernel={kernel!r} is not supported; use one of {KERNELS}.")
  return kernel


def _use_pallas(kernel: str, dtype, bits: int, group_size: int) -> bool:
  """Whether to run the fused Pallas kernel: always for "pallas", on a GPU when it applies for "auto"."""
  if kernel == "xla":
    return False
  if kernel == "pallas":
    return True
  if jax.default_backend() != "gpu":
    return False
  from jact import kernels
  return kernels.supports(dtype, bits, group_size)
