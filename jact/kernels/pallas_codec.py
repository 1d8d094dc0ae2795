"""Fused Pallas kernels for the codec: quantise+pack and unpack+dequantise, each in one pass.

XLA compiles the jnp reference (`jact.codec`) into at least two passes over x (the min/max
reduction, then the codes); `quantize_pallas` reads each group once into registers, reduces it
to (lo, hi), hashes the noise from the element's index and bits on the spot, and writes only the
packed bytes and the bfloat16 bounds. `dequantize_pallas` reads the bytes and bounds once and
writes the values. Both produce the reference's bits: their arithmetic is `formulas`, the same
operations in the same order.

Layout. A kernel sees the flattened group view of `codec.Layout.to_groups` (a reshape, or the
padded copy of the fallback layout) as `(num_groups, group_size // per_byte, per_byte)`, where the
last axis holds the codes of one byte. Each program takes `block_rows` whole groups, so the group
reductions stay in registers and packing reduces only that last axis; no reshape happens inside a
kernel. Element j of group i gets noise index i * group_size + j, as in the reference.

Backend. On GPU the kernels are lowered by Pallas' Triton backend, chosen explicitly with
`pallas.triton.CompilerParams`. Since JAX 0.11 a `pallas_call` without compiler params goes to
Mosaic GPU, and Triton is deprecated (it warns), but Triton is what lowers this kernel today: it
has every operation the codec needs on register blocks (reductions along an axis, broadcasting,
uint32 multiply and shifts, bitcasts, floor, uint8 arithmetic), while Mosaic GPU lowers no
`floor`, reduces along one axis only in tiled layouts and restricts reshapes and broadcasts to
layout-compatible cases, and `pallas_call` on Mosaic GPU is itself deprecated in favour of
`plgpu.kernel`, a different programming model. A memory-bound elementwise-plus-row-reduction
kernel is the case Triton handles well. The Triton lowering can be checked without a GPU (see
tests/test_kernels.py); moving to Mosaic GPU means rewriting the kernel bodies, not `formulas`.
Triton needs power-of-two block sizes, hence power-of-two group sizes. On other backends the
kernels run in Pallas' interpret mode (a reference for tests, not fast).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jact import codec
from jact.codec import formulas, hashing
from jact.kernels import KERNEL_DTYPES, is_power_of_two, supports  # noqa: F401  (supports: re-exported)

# Values per program: 16 groups of 256; at 8 warps each thread holds 16 of them in registers,
# few enough for the hash's temporaries not to spill. A guess until benchmarks/gpu/kernels.py's
# block_rows sweep has run on a GPU.
ELEMENTS_PER_BLOCK = 4096
NUM_WARPS = 8


def quantize_pallas(x: jax.Array, bits: int = 2, group_size: int = 256, rounding: str = "stochastic",
                    seed: int | jax.Array = 0, *, interpret: bool | None = None,
                    block_rows: int | None = None) -> codec.QuantizedArray:
  """`jact.codec.quantize` as one fused kernel; the result is bitwise the reference's.

  Args:
    x: float16, bfloat16 or float32 array of any shape.
    bits: 1, 2, 4 or 8.
    group_size: elements sharing one (lo, hi) pair; a power of two, at least 64.
    rounding: "stochastic" or "nearest", as in `jact.codec.quantize`.
    seed: int or uint32 scalar (may be traced), as in `jact.codec.quantize`.
    interpret: run the kernel in Pallas' interpret mode; None: compiled when lowered for a GPU,
      interpreted for any other platform.
    block_rows: groups per program, a power of two; None picks `ELEMENTS_PER_BLOCK // group_size`.

  Returns:
    A `jact.QuantizedArray` equal leaf for leaf to `jact.codec.quantize(x, bits, group_size,
    rounding, seed)`.
  """
  x = jnp.asarray(x)
  dtype = codec.check_float_dtype(x.dtype)
  bits = codec.check_bits(bits)
  group_size = codec.check_group_size(group_size)
  rounding = codec.check_rounding(rounding)
  _check_supported(dtype, bits, group_size)
  shape = tuple(x.shape)
  if codec.Layout.of(shape, group_size).num_groups == 0:
    return codec.quantize(x, bits, group_size, rounding, seed)  # empty: nothing to compute
  block_rows = _check_block_rows(block_rows)
  run = lambda interpret: functools.partial(_quantize_groups, bits=bits, group_size=group_size, rounding=rounding,
                                            interpret=interpret, block_rows=block_rows)
  payload, lo, hi = _per_platform(interpret, run, x, jnp.asarray(seed, jnp.uint32))
  return codec.QuantizedArray(payload, lo, hi, shape, dtype, bits, group_size)


def dequantize_pallas(q: codec.QuantizedArray, *, interpret: bool | None = None,
                      block_rows: int | None = None) -> jax.Array:
  """`jact.codec.dequantize` as one fused kernel; the result is bitwise the reference's.

  Leaves with extra leading axes (from `vmap` over `quantize`) are handled as the reference does:
  the extra axes are kept in front.

  Args:
    q: a `jact.QuantizedArray` with bits 1, 2, 4 or 8 whose dtype and group size `supports`.
    interpret: run the kernel in Pallas' interpret mode; None: compiled when lowered for a GPU,
      interpreted for any other platform.
    block_rows: groups per program, a power of two; None picks `ELEMENTS_PER_BLOCK // group_size`.
  """
  if not isinstance(q, codec.QuantizedArray):
    raise TypeError(f"dequantize_pallas expects a jact.QuantizedArray, got {type(q).__name__}.")
  _check_supported(q.dtype, q.bits, q.group_size)
  if q.layout.num_groups == 0:
    return codec.dequantize(q)  # empty: nothing to compute
  block_rows = _check_block_rows(block_rows)
  run = lambda interpret: functools.partial(_dequantize_groups, shape=q.shape, dtype=jnp.dtype(q.dtype), bits=q.bits,
                                            group_size=q.group_size, interpret=interpret, block_rows=block_rows)
  return _per_platform(interpret, run, q.payload, q.lo, q.hi)


# --- kernels -----------------------------------------------------------------------------------

def _quantize_kernel(key_ref, x_ref, payload_ref, lo_ref, hi_ref, *, bits: int, group_size: int,
                     rounding: str, block_rows: int):
  x = x_ref[...]
  values = x.astype(jnp.float32)
  levels = 2**bits - 1
  lo_exact, hi_exact = formulas.group_min_max(values, axes=(1, 2))
  lo, hi, constant = formulas.group_bounds(lo_exact, hi_exact)
  scale = formulas.grid_scale(lo, hi, levels, codec.MIN_RANGE)
  if rounding == "stochastic":
    index = _element_index(x.shape, block_rows, group_size)
    noise = hashing.uniform(key_ref[0], index, hashing.value_bits(x), np.float32)
  else:
    noise = np.float32(0.5)
  codes = formulas.quantize_codes(values, lo[:, None, None], scale[:, None, None], noise, levels)
  packed = formulas.pack_codes(codes, bits)
  # A constant group stores its first element's bits, as the reference does.
  exact = formulas.value_bytes(x_ref[:, 0, 0], packed.shape[-1])
  payload_ref[...] = jnp.where(constant[:, None], exact, packed)
  lo_ref[...] = lo
  hi_ref[...] = hi


def _element_index(shape: tuple[int, int, int], block_rows: int, group_size: int) -> jax.Array:
  """uint32 index `group * group_size + position` of each element of this program's block."""
  _, _, per_byte = shape
  group = pl.program_id(0) * block_rows + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  position = (jax.lax.broadcasted_iota(jnp.uint32, shape, 1) * np.uint32(per_byte)
              + jax.lax.broadcasted_iota(jnp.uint32, shape, 2))
  return group.astype(jnp.uint32) * np.uint32(group_size) + position


def _dequantize_kernel(payload_ref, lo_ref, hi_ref, values_ref, *, bits: int, dtype):
  payload = payload_ref[...]
  codes = formulas.unpack_codes(payload, bits).astype(jnp.float32)
  lo = lo_ref[...].astype(jnp.float32)[:, None, None]
  hi = hi_ref[...].astype(jnp.float32)[:, None, None]
  values = formulas.decode_codes(codes, lo, hi, 2**bits - 1)
  exact = formulas.bytes_value(payload, dtype).astype(jnp.float32)[:, None, None]
  values_ref[...] = jnp.where(lo == hi, exact, values).astype(dtype)


# --- calls -------------------------------------------------------------------------------------

# Jitted like the reference, so that same-shaped residuals share one trace and one lowering.
@functools.partial(jax.jit, static_argnames=("bits", "group_size", "rounding", "interpret", "block_rows"))
def _quantize_groups(x, seed, bits: int, group_size: int, rounding: str, interpret: bool,
                     block_rows: int | None):
  layout = codec.Layout.of(x.shape, group_size)
  per_byte = 8 // bits
  width = group_size // per_byte
  num_groups = layout.num_groups
  rows = _block_rows(num_groups, group_size, block_rows)
  kernel = functools.partial(_quantize_kernel, bits=bits, group_size=group_size, rounding=rounding,
                             block_rows=rows)
  payload, lo, hi = _pallas_call(
      kernel, num_groups, rows, interpret,
      in_specs=[pl.BlockSpec((1,), lambda i: (0,)),
                pl.BlockSpec((rows, width, per_byte), lambda i: (i, 0, 0))],
      out_specs=[pl.BlockSpec((rows, width), lambda i: (i, 0)),
                 pl.BlockSpec((rows,), lambda i: (i,)),
                 pl.BlockSpec((rows,), lambda i: (i,))],
      out_shape=[jax.ShapeDtypeStruct((num_groups, width), jnp.uint8),
                 jax.ShapeDtypeStruct((num_groups,), jnp.bfloat16),
                 jax.ShapeDtypeStruct((num_groups,), jnp.bfloat16)],
  )(hashing.seed_key(seed).reshape(1), layout.to_groups(x).reshape(num_groups, width, per_byte))
  group_shape = layout.group_shape
  return payload.reshape(group_shape + (width,)), lo.reshape(group_shape), hi.reshape(group_shape)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "bits", "group_size", "interpret", "block_rows"))
def _dequantize_groups(payload, lo, hi, shape, dtype, bits: int, group_size: int, interpret: bool,
                       block_rows: int | None):
  layout = codec.Layout.of(shape, group_size)
  width = payload.shape[-1]
  batch = payload.shape[:payload.ndim - len(layout.group_shape) - 1]
  num_groups = payload.size // width  # vmap's batch axes too: every group decodes on its own
  rows = _block_rows(num_groups, group_size, block_rows)
  values = _pallas_call(
      functools.partial(_dequantize_kernel, bits=bits, dtype=dtype), num_groups, rows, interpret,
      in_specs=[pl.BlockSpec((rows, width), lambda i: (i, 0)),
                pl.BlockSpec((rows,), lambda i: (i,)),
                pl.BlockSpec((rows,), lambda i: (i,))],
      out_specs=pl.BlockSpec((rows, width, 8 // bits), lambda i: (i, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((num_groups, width, 8 // bits), dtype),
  )(payload.reshape(num_groups, width), lo.reshape(num_groups), hi.reshape(num_groups))
  return layout.from_groups(values.reshape(batch + layout.group_shape + (group_size,)))


def _pallas_call(kernel, num_groups: int, rows: int, interpret: bool, **specs):
  compiler_params = None if interpret else pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1)
  return pl.pallas_call(kernel, grid=(pl.cdiv(num_groups, rows),), interpret=interpret,
                        compiler_params=compiler_params, **specs)


# --- checks and sizes --------------------------------------------------------------------------

def _check_supported(dtype, bits: int, group_size: int) -> None:
  if jnp.dtype(dtype) not in KERNEL_DTYPES:
    raise TypeError(f"The Pallas codec kernels take {', '.join(map(str, KERNEL_DTYPES))}, not "
                    f"{jnp.dtype(dtype)}; use jact.codec.quantize / dequantize for it.")
  if bits not in codec.PACKED_BITS:
    raise ValueError(f"The Pallas codec kernels take bits in {codec.PACKED_BITS}, not {bits}; bits 16 and 32 "
                     "are casts, use jact.codec.quantize / dequantize.")
  if not is_power_of_two(group_size):
    raise ValueError(f"The Pallas codec kernels need a power-of-two group_size (Triton blocks are), "
                     f"not {group_size}; use jact.codec.quantize / dequantize for it.")


def _check_block_rows(block_rows: int | None) -> int | None:
  if block_rows is not None and not is_power_of_two(block_rows):
    raise ValueError(f"block_rows={block_rows!r} must be a power of two (or None for the default).")
  return block_rows


def _block_rows(num_groups: int, group_size: int, block_rows: int | None) -> int:
  """Groups per program: the requested count, else a block of about ELEMENTS_PER_BLOCK values,
  never more than the power of two that covers all groups."""
  if block_rows is not None:
    return block_rows
  return min(max(1, ELEMENTS_PER_BLOCK // group_size), 1 << (num_groups - 1).bit_length())


def _per_platform(interpret: bool | None, run: Callable[[bool], Any], *operands) -> Any:
  """`run(interpret)(*operands)`; with `interpret=None`, compiled when the function is lowered
  for a GPU and interpreted on any other platform (decided at lowering, not by the default
  backend, so that compiling for a GPU without one runs the compiled kernel)."""
  if interpret is not None:
    return run(bool(interpret))(*operands)
  return jax.lax.platform_dependent(*operands, cuda=run(False), rocm=run(False), default=run(True))
