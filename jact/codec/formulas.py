"""The codec's per-group arithmetic, written with operations that lower both in XLA and in Pallas.

Each function reproduces one step of `jact.codec.quantize` / `jact.codec.dequantize` with the same
floating-point operations in the same order, so that a kernel built from them stores the
reference's bits. Where the reference uses an operation that the Pallas GPU (Triton) lowering does
not have, or lowers with different semantics, an exact equivalent takes its place:

* `jnp.nextafter` on bfloat16 (no lowering) -> `bf16_step`, integer steps on the bit pattern
  (as XLA expands it, less the cases that directed rounding never steps from);
* float min/max, which Triton lowers NaN-ignoring (`maxnumf`) where XLA means to propagate NaN ->
  `group_min_max` adds an explicit NaN flag (XLA:CPU itself drops NaN in row-wise min/max of
  arrays with several rows of 512 or more float32 values, so the reference misses those);
* float -> uint8 of NaN (0 in XLA, poison in LLVM) -> `quantize_codes` selects 0 explicitly;
* `bitcast_convert_type` between widths (no lowering) and slicing of values (no lowering) ->
  shifts, masks and a masked sum (`value_bytes`, `bytes_value`).

The functions work on any leading shape; the group's elements lie along `axes` (or the last axis
for codes packed into bytes: `(..., bytes, codes_per_byte)`). The module depends on jax alone, so
that `jact.codec` can build its reference from it too.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_BF16_SIGN = np.uint16(0x8000)
_BF16_MAGNITUDE = np.uint16(0x7FFF)


def group_min_max_xla(values: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-group (min, max) over the last axis, NaN for a group holding a NaN, for XLA.

  One variadic reduction whose minimum/maximum propagate NaN: a single pass and no temporary.
  (`jnp.min` on XLA:CPU is a library reduction that drops NaN for rows of 512 or more; an
  explicit NaN flag, as `group_min_max` has, costs a full-size integer temporary there.) Min and
  max are exact, so both forms give the same values.
  """
  inf = np.array(np.inf, values.dtype)
  return jax.lax.reduce((values, values), (inf, -inf),
                        lambda a, b: (jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1])), (values.ndim - 1,))


def group_min_max(values: jax.Array, axes: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """Per-group float32 (min, max) over `axes`; NaN for a group holding a NaN (for kernels)."""
  axes = tuple(axes)
  has_nan = jnp.max(jnp.isnan(values).astype(jnp.int32), axis=axes) > 0
  lo = jnp.where(has_nan, np.float32(np.nan), jnp.min(values, axis=axes))
  hi = jnp.where(has_nan, np.float32(np.nan), jnp.max(values, axis=axes))
  return lo, hi


def bf16_step(value: jax.Array, direction: float) -> jax.Array:
  """`jnp.nextafter(value, direction * inf)` for bfloat16 that is not NaN and not the infinity of
  `direction` (the only values `bf16_toward` steps from), as integer steps on the bit pattern."""
  bits = jax.lax.bitcast_convert_type(value, jnp.uint16)
  toward = _BF16_SIGN if direction < 0 else np.uint16(0)  # the sign bit of `direction`
  # A value of the sign of `direction` grows in magnitude, and so does the zero of the other sign
  # (it becomes the least subnormal of that sign); every other value shrinks.
  grows = ((bits & _BF16_SIGN) == toward) | (bits == (toward ^ _BF16_SIGN))
  grown = (bits | _BF16_SIGN if direction < 0 else bits & _BF16_MAGNITUDE) + np.uint16(1)
  return jax.lax.bitcast_convert_type(jax.lax.select(grows, grown, bits - np.uint16(1)), jnp.bfloat16)


def bf16_toward(value: jax.Array, direction: float) -> jax.Array:
  """float32 `value` rounded to bfloat16 downward (direction < 0) or upward (direction > 0)."""
  rounded = value.astype(jnp.float32).astype(jnp.bfloat16)
  back = rounded.astype(value.dtype)
  # False for NaN; and rounding never overshoots to the infinity of `direction`.
  wrong_side = back > value if direction < 0 else back < value
  return jax.lax.select(wrong_side, bf16_step(rounded, direction), rounded)


def group_bounds(lo_exact: jax.Array, hi_exact: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The stored bfloat16 (lo, hi) of each group and whether the group is constant."""
  constant = lo_exact == hi_exact  # False for NaN groups
  lo = bf16_toward(lo_exact, -1.0)
  hi = jax.lax.select(constant, lo, bf16_toward(hi_exact, +1.0))
  return lo, hi, constant


def grid_scale(lo: jax.Array, hi: jax.Array, levels: int, min_range: float) -> jax.Array:
  """Grid points per unit of value, from the stored bfloat16 bounds and a floor on the range."""
  return levels / jnp.maximum(hi.astype(jnp.float32) - lo.astype(jnp.float32), np.float32(min_range))


def quantize_codes(values: jax.Array, lo: jax.Array, scale: jax.Array, noise, levels: int) -> jax.Array:
  """uint8 grid indices: `floor((values - lo) * scale + noise)` clipped to [0, levels]; NaN -> 0."""
  scaled = (values - lo.astype(jnp.float32)) * scale
  index = jnp.floor(scaled + noise)
  clipped = jnp.minimum(jnp.maximum(index, np.float32(0)), np.float32(levels))
  return jax.lax.select(jnp.isnan(index), jnp.zeros_like(index), clipped).astype(jnp.uint8)


def _code_shifts(shape: tuple[int, ...], bits: int) -> jax.Array:
  return jax.lax.broadcasted_iota(jnp.uint8, shape, len(shape) - 1) * np.uint8(bits)


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
  """(..., bytes, 8 // bits) uint8 codes -> (..., bytes) bytes, low bits first."""
  return jnp.sum(codes << _code_shifts(codes.shape, bits), axis=-1, dtype=jnp.uint8)  # disjoint bits


def unpack_codes(payload: jax.Array, bits: int) -> jax.Array:
  """(..., bytes) bytes -> (..., bytes, 8 // bits) uint8 codes; inverse of `pack_codes`."""
  shape = payload.shape + (8 // bits,)
  return (payload[..., None] >> _code_shifts(shape, bits)) & np.uint8(2**bits - 1)


def decode_codes(codes: jax.Array, lo: jax.Array, hi: jax.Array, levels: int) -> jax.Array:
  """float32 grid values `lo + codes * ((hi - lo) / levels)` of float codes and float32 bounds."""
  return lo + codes * ((hi - lo) / levels)


def value_bytes(values: jax.Array, width: int) -> jax.Array:
  """Per-group exact values -> (..., width) bytes: their bit pattern little-endian, zero-padded."""
  itemsize = jnp.dtype(values.dtype).itemsize
  bits = jax.lax.bitcast_convert_type(values, jnp.dtype(f"uint{8 * itemsize}")).astype(jnp.uint32)
  position = jax.lax.broadcasted_iota(jnp.uint32, values.shape + (width,), values.ndim)
  # Clamped shift amounts: shifting a uint32 by 32 or more is undefined in LLVM.
  byte = (bits[..., None] >> (np.uint32(8) * jnp.minimum(position, np.uint32(itemsize - 1)))) & np.uint32(0xFF)
  return jnp.where(position < itemsize, byte, np.uint32(0)).astype(jnp.uint8)


def bytes_value(payload: jax.Array, dtype) -> jax.Array:
  """(..., width) bytes -> the value of `dtype` whose little-endian bit pattern leads them."""
  itemsize = jnp.dtype(dtype).itemsize
  position = jax.lax.broadcasted_iota(jnp.uint32, payload.shape, payload.ndim - 1)
  byte = payload.astype(jnp.uint32) << (np.uint32(8) * jnp.minimum(position, np.uint32(itemsize - 1)))
  bits = jnp.sum(jnp.where(position < itemsize, byte, np.uint32(0)), axis=-1, dtype=jnp.uint32)
  return jax.lax.bitcast_convert_type(bits.astype(jnp.dtype(f"uint{8 * itemsize}")), dtype)
