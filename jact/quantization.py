"""`jact.quantize` and `jact.dequantize`: the codec, run by the fused Pallas kernels or the reference.

Both implementations produce the same bits (`jact.kernels` shares its arithmetic with
`jact.codec`), so the choice is one of speed and memory only. `kernel="auto"` follows the platform
a function is *lowered for* (`jax.lax.platform_dependent`), not the default backend: a step
compiled for a GPU without one (`jact.memory.compiled(..., target="h100")`) contains exactly the
kernels a GPU would run. Where no GPU can be targeted -- no GPU backend and no CUDA plugin in this
process -- "auto" is the reference alone and Pallas is never imported.
"""

from __future__ import annotations

from typing import Any

import functools
import importlib.util

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
  choice = _kernel_for(kernel, dtype, bits, group_size, x)
  if choice is None:
    return codec.quantize(x, bits, group_size, rounding, seed)
  from jact.kernels import pallas_codec
  if choice == "pallas":  # compiled on a GPU, interpreted elsewhere (the kernel's own rule)
    return pallas_codec.quantize_pallas(x, bits, group_size, rounding, seed)
  return _on_gpu(lambda x, seed: pallas_codec.quantize_pallas(x, bits, group_size, rounding, seed, interpret=False),
                 lambda x, seed: codec.quantize(x, bits, group_size, rounding, seed),
                 x, jnp.asarray(seed, jnp.uint32))


def dequantize(q: QuantizedArray, kernel: str = "auto") -> jax.Array:
  """Restores an array of `q.shape` and `q.dtype` from a `QuantizedArray`.

  `kernel` chooses the implementation as in `quantize`; any of them decodes any codes.

  Leading axes that the leaves carry beyond the stored layout (from `vmap` over `quantize`) are
  treated as batch axes and kept in front.
  """
  kernel = check_kernel(kernel)
  if not isinstance(q, QuantizedArray):
    raise TypeError(f"dequantize expects a jact.QuantizedArray, got {type(q).__name__}.")
  choice = _kernel_for(kernel, q.dtype, q.bits, q.group_size, q.payload)
  if choice is None:
    return codec.dequantize(q)
  from jact.kernels import pallas_codec
  if choice == "pallas":
    return pallas_codec.dequantize_pallas(q)
  return _on_gpu(lambda q: pallas_codec.dequantize_pallas(q, interpret=False), codec.dequantize, q)


def check_kernel(kernel: Any) -> str:
  """Returns `kernel`, or raises a ValueError naming the accepted implementations."""
  if kernel not in KERNELS:
    raise ValueError(f"kernel={kernel!r} is not supported; use one of {KERNELS}.")
  return kernel


def _kernel_for(kernel: str, dtype, bits: int, group_size: int, operand: jax.Array) -> str | None:
  """Which implementation runs: "pallas" (the kernel on every platform, interpreted off GPU),
  "gpu" (auto: the compiled kernel on a GPU, the reference elsewhere), or None (the reference).

  "auto" keeps the reference for arrays split over devices: a kernel is one opaque call that
  XLA's partitioner would run on whole arrays, and it cannot take explicitly sharded arrays or
  the per-device arrays inside `shard_map` at all.
  """
  if bits not in codec.PACKED_BITS or kernel == "xla":
    return None
  if kernel == "pallas":
    return "pallas"
  from jact.kernels import supports  # (no Pallas import: see jact.kernels)
  if not (supports(dtype, bits, group_size) and _gpu_possible()) or _split_over_devices(operand):
    return None
  return "gpu"


def _split_over_devices(x: jax.Array) -> bool:
  """Whether `x` is (or may be) split over several devices."""
  if jax.device_count() > 1:
    return True
  aval = jax.typeof(x)
  sharding = getattr(aval, "sharding", None)
  spec = getattr(sharding, "spec", ())
  return bool(getattr(aval, "vma", ())) or any(axis is not None for axis in spec)


def _on_gpu(kernel, reference, *operands):
  """`kernel(*operands)` where the function is lowered for a GPU, `reference(*operands)` elsewhere."""
  return jax.lax.platform_dependent(*operands, cuda=kernel, rocm=kernel, default=reference)


@functools.cache
def _gpu_possible() -> bool:
  """Whether this process can lower for a GPU: a GPU backend, or the CUDA plugin for compiling
  without one."""
  if jax.default_backend() == "gpu":
    return True
  return any(importlib.util.find_spec(f"jax_plugins.{name}") is not None
             for name in ("xla_cuda13", "xla_cuda12"))
