"""Pallas kernels for the codec: fused quantise+pack and unpack+dequantise.

`pallas_codec.quantize_pallas` / `pallas_codec.dequantize_pallas` take the arguments of
`jact.codec.quantize` / `jact.codec.dequantize` (the reference) and return bitwise the same
results, in one pass over memory each. They run compiled when lowered for a GPU (Pallas' Triton
backend) and interpreted elsewhere; `supports` says which dtypes, bit widths and group sizes they
handle (the rest stays on the reference). This package's own namespace imports no Pallas: the
kernels are loaded from `jact.kernels.pallas_codec` when one is used.
"""

import jax.numpy as jnp
import numpy as np

from jact import codec

KERNEL_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32))


def is_power_of_two(n) -> bool:
  return isinstance(n, (int, np.integer)) and n > 0 and n & (n - 1) == 0


def supports(dtype, bits: int, group_size: int) -> bool:
  """Whether the kernels handle this dtype, bit width and group size; if not, use `jact.codec`.

  float64 (no float64 kernels: it is rare in training and its 64-bit noise folding would need
  64-bit integer lanes), bits 16 and 32 (plain casts, nothing to fuse) and group sizes that are
  not a power of two (Triton blocks must be) stay on the jnp reference.
  """
  return jnp.dtype(dtype) in KERNEL_DTYPES and bits in codec.PACKED_BITS and is_power_of_two(group_size)
