"""The codec: per-group affine quantisation with stochastic rounding, packed into bytes.

This is the pure jax.numpy reference; `jact.kernels` holds the fused Pallas version, which
produces bit-identical codes, and `jact.quantization` chooses between the two.

Grouping. A group is `group_size` consecutive elements in row-major order. The array is viewed
as `shape[:lead] + (cols,)`, where `cols` is the product of the fewest trailing axes whose size is
a multiple of `group_size`, and groups tile `cols`. Groups therefore follow the innermost
(feature/channel) axis, where activations of one example and position share a scale, they need
no padding, and they never cross the leading (batch, sequence, spatial) axes, so an array sharded
along those axes is quantised with no communication. When no trailing product is a multiple of
`group_size` the whole array is flattened and the last group is padded with its last element
(which leaves that group's range unchanged).

Per-group code. With `lo`/`hi` the group's min/max and `L = 2**bits - 1` levels, the grid is
`lo' + k * step` for k = 0..L, where `lo'` is `lo` rounded down and `hi'` is `hi` rounded up to
bfloat16 and `step = (hi' - lo') / L`; each element stores its grid index in `bits` bits.
Metadata is the pair (lo', hi') in bfloat16: 32 bits per group, 0.125 bits per value at the
default group size of 256. bfloat16 keeps float32's exponent range, so no activation overflows
it, and values 0 and 1 (ReLU masks, dropout masks) stay exactly on the grid. Error: at most
`step` with stochastic rounding (which is unbiased: E[decode] = x), at most `step / 2` with nearest
rounding; `step` exceeds `(hi - lo) / L` only by the bfloat16 rounding of the two ends
(relative 2**-8 of |lo| and |hi|).

Special groups. A constant group (lo == hi) stores lo' == hi' and its exact value in the group's
payload bytes, so it round-trips bit for bit in any dtype (its codes would all be zero anyway).
A group holding NaN or +-Inf has non-finite metadata and decodes to non-finite values: a
non-finite activation keeps the gradient non-finite, as it would be without compression.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jact.codec import formulas, hashing  # formulas: the arithmetic shared with the Pallas kernels

PACKED_BITS = (1, 2, 4, 8)
SUPPORTED_BITS = PACKED_BITS + (16, 32)
ROUNDINGS = ("stochastic", "nearest")
FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))
GROUP_SIZE_QUANTUM = 64  # group_size must be a multiple: one byte at 1 bit, room for a float64
METADATA_BITS_PER_GROUP = 32  # (lo, hi) in bfloat16
# Floor on a group's range: keeps levels / range finite and range / levels a normal float32 for up
# to 255 levels (XLA:CPU flushes subnormals to zero). A group whose range is below it (values
# within ~3e-36 of each other) decodes within its range instead of within one grid step.
MIN_RANGE = 2.0**-118


def check_bits(bits: Any, what: str = "bits") -> int:
  """Returns `bits` as an int, or raises a ValueError naming the accepted widths."""
  if bits is None:
    return 32
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in SUPPORTED_BITS:
    raise ValueError(f"{what}={bits!r} is not supported; use one of {SUPPORTED_BITS} (or None, same as 32).")
  return int(bits)


def check_group_size(group_size: Any) -> int:
  if (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))
      or group_size <= 0 or group_size % GROUP_SIZE_QUANTUM):
    raise ValueError(f"group_size={group_size!r} must be a positive multiple of {GROUP_SIZE_QUANTUM} "
                     "(for example 64, 128, 256, 512).")
  return int(group_size)


def check_float_dtype(dtype: Any, what: str = "x") -> np.dtype:
  dtype = jnp.dtype(dtype)
  if dtype not in FLOAT_DTYPES:
    raise TypeError(f"{what} has dtype {dtype}; jact compresses floating-point arrays only "
                    f"({', '.join(map(str, FLOAT_DTYPES))}).")
  return dtype


def check_rounding(rounding: Any) -> str:
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding={rounding!r} is not supported; use one of {ROUNDINGS}.")
  return rounding


@dataclasses.dataclass(frozen=True)
class Layout:
  """How an array of `shape` is cut into groups (see the module docstring)."""
  shape: tuple[int, ...]
  group_size: int
  lead: int  # leading axes kept as they are; groups tile the product of the others

  @classmethod
  def of(cls, shape: tuple[int, ...], group_size: int) -> "Layout":
    shape = tuple(int(d) for d in shape)
    if math.prod(shape) > 0:
      for lead in range(len(shape), 0, -1):
        if math.prod(shape[lead:]) % group_size == 0:
          return cls(shape, group_size, lead)
    return cls(shape, group_size, 0)

  @property
  def cols(self) -> int:
    return math.prod(self.shape[self.lead:])

  @property
  def num_groups_per_row(self) -> int:
    return -(-self.cols // self.group_size)

  @property
  def num_groups(self) -> int:
    return math.prod(self.shape[:self.lead]) * self.num_groups_per_row

  @property
  def group_shape(self) -> tuple[int, ...]:
    """Shape of the per-group metadata."""
    return self.shape[:self.lead] + (self.num_groups_per_row,)

  def to_groups(self, x: jax.Array) -> jax.Array:
    """(…) -> group_shape + (group_size,), padding the flattened tail with its last element."""
    rows = self.shape[:self.lead]
    flat = x.reshape(rows + (self.cols,))
    pad = self.num_groups_per_row * self.group_size - self.cols
    if pad:
      flat = jnp.pad(flat, [(0, 0)] * len(rows) + [(0, pad)], mode="edge")
    return flat.reshape(self.group_shape + (self.group_size,))

  def from_groups(self, groups: jax.Array) -> jax.Array:
    """Inverse of `to_groups`; extra leading axes (from `vmap`) are kept in front."""
    batch = groups.shape[:groups.ndim - len(self.group_shape) - 1]
    flat = groups.reshape(batch + self.shape[:self.lead] + (self.num_groups_per_row * self.group_size,))
    return flat[..., :self.cols].reshape(batch + self.shape)


def payload_nbytes(num_elements: int, bits: int, group_size: int, dtype) -> int:
  """Bytes that `quantize` stores for an array of `num_elements` (payload plus metadata)."""
  if bits == 32:
    return num_elements * jnp.dtype(dtype).itemsize
  if bits == 16:
    return num_elements * 2
  groups = -(-num_elements // group_size) if num_elements else 0
  # Only the fallback layout pads; an exact count follows from Layout when the shape is known.
  return groups * (group_size * bits // 8 + METADATA_BITS_PER_GROUP // 8)


def stored_nbytes(shape: tuple[int, ...], dtype, bits: int, group_size: int) -> int:
  """Exact bytes held by `quantize(x, bits, group_size)` for an `x` of this shape and dtype."""
  n = math.prod(shape)
  if bits in (16, 32):
    return payload_nbytes(n, bits, group_size, dtype)
  groups = Layout.of(shape, group_size).num_groups
  return groups * (group_size * bits // 8 + METADATA_BITS_PER_GROUP // 8)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """A compressed array: packed codes plus per-group (lo, hi) metadata.

  A registered pytree (its arrays are leaves, its shape, dtype, bits and group size are static),
  so it passes through `jit`, `vmap`, `scan` and `custom_vjp` residuals. Under `vmap` the leaves
  carry extra leading axes; `dequantize` handles them.

  Attributes:
    payload: uint8 codes, `bits` per value, packed densely, shape `group_shape + (group_size *
      bits // 8,)`; for bits=16 the bfloat16 values; for bits=32 the original array.
    lo, hi: per-group bfloat16 bounds of the code grid (None for bits 16 and 32); lo == hi marks
      a constant group, whose exact value is in its payload bytes.
    shape, dtype: of the original array.
    bits, group_size: the code's parameters.
  """
  payload: jax.Array
  lo: jax.Array | None
  hi: jax.Array | None
  shape: tuple[int, ...]
  dtype: Any
  bits: int
  group_size: int

  def tree_flatten(self):
    return (self.payload, self.lo, self.hi), (self.shape, self.dtype, self.bits, self.group_size)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def nbytes(self) -> int:
    """True bytes held: the packed payload plus the per-group metadata."""
    return sum(int(leaf.size) * jnp.dtype(leaf.dtype).itemsize
               for leaf in (self.payload, self.lo, self.hi) if leaf is not None)

  @property
  def layout(self) -> Layout:
    return Layout.of(self.shape, self.group_size)

  def __repr__(self) -> str:
    return (f"QuantizedArray(shape={self.shape}, dtype={jnp.dtype(self.dtype).name}, bits={self.bits}, "
            f"group_size={self.group_size}, nbytes={self.nbytes})")


def _compute_dtype(dtype) -> np.dtype:
  return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _pack(codes: jax.Array, bits: int) -> jax.Array:
  """uint8 codes (..., n) each < 2**bits -> (..., n * bits // 8) bytes, low bits first."""
  per_byte = 8 // bits
  return formulas.pack_codes(codes.reshape(codes.shape[:-1] + (codes.shape[-1] // per_byte, per_byte)), bits)


def _unpack(payload: jax.Array, bits: int) -> jax.Array:
  codes = formulas.unpack_codes(payload, bits)
  return codes.reshape(payload.shape[:-1] + (payload.shape[-1] * (8 // bits),))


# A constant group's exact value in its payload bytes, little-endian, as the kernels store it. The
# kernels' shift-and-mask form covers 32-bit words; float64 (reference path only) uses a bitcast.
def _value_bytes(values: jax.Array, width: int) -> jax.Array:
  if jnp.dtype(values.dtype).itemsize <= 4:
    return formulas.value_bytes(values, width)
  raw = jax.lax.bitcast_convert_type(values, jnp.uint8)
  return jnp.pad(raw, [(0, 0)] * values.ndim + [(0, width - raw.shape[-1])])


def _bytes_value(payload: jax.Array, dtype) -> jax.Array:
  # A bitcast: XLA fuses it into the decoding (the kernels' shift-and-sum needs a reduction).
  return jax.lax.bitcast_convert_type(payload[..., :jnp.dtype(dtype).itemsize], dtype)


def quantize(x: jax.Array, bits: int = 2, group_size: int = 256, rounding: str = "stochastic",
             seed: int | jax.Array = 0) -> QuantizedArray:
  """Compresses a float array to `bits` per value: `jact.quantize` (whose docstring gives the
  arguments) with the jax.numpy implementation."""
  x = jnp.asarray(x)
  dtype = check_float_dtype(x.dtype)
  bits = check_bits(bits)
  group_size = check_group_size(group_size)
  rounding = check_rounding(rounding)
  shape = tuple(x.shape)
  if bits == 32:
    return QuantizedArray(x, None, None, shape, dtype, bits, group_size)
  if bits == 16:
    return QuantizedArray(x.astype(jnp.bfloat16), None, None, shape, dtype, bits, group_size)
  try:
    payload, lo, hi = _quantize_packed(x, jnp.asarray(seed, jnp.uint32), bits, group_size, rounding)
  except Exception as error:
    if type(error).__name__ != "ShardingTypeError":
      raise
    raise ValueError(
        f"cannot group an array of shape {shape} sharded as {jax.typeof(x).sharding.spec} into groups "
        f"of {group_size}: a group would span devices. Choose a group_size that divides each "
        f"device's share of the innermost axes (e.g. 64).") from error
  return QuantizedArray(payload, lo, hi, shape, dtype, bits, group_size)


def _grid(values: jax.Array, bits: int):
  """Per-group (lo', hi', levels / (hi' - lo'), constant) of grouped `values` (see the module doc)."""
  lo_exact, hi_exact = formulas.group_min_max_xla(values)
  lo, hi, constant = formulas.group_bounds(lo_exact, hi_exact)
  return lo, hi, formulas.grid_scale(lo, hi, 2**bits - 1, MIN_RANGE), constant


# Jitted so that the many same-shaped residuals of a deep network share one trace and lowering. (XLA
# inlines it into the caller early, so that it fuses with the residual's producer and consumers.)
@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _quantize_packed(x: jax.Array, seed: jax.Array, bits: int, group_size: int, rounding: str):
  layout = Layout.of(x.shape, group_size)
  compute = _compute_dtype(x.dtype)
  groups = layout.to_groups(x)
  values = groups.astype(compute)
  lo, hi, scale, constant = _grid(values, bits)
  if rounding == "stochastic":
    index = jnp.arange(layout.num_groups * group_size, dtype=jnp.uint32).reshape(groups.shape)
    noise = hashing.uniform(hashing.seed_key(seed), index, hashing.value_bits(groups), compute.type)
  else:
    noise = compute.type(0.5)
  codes = formulas.quantize_codes(values, lo[..., None], scale[..., None], noise, 2**bits - 1)
  payload = _pack(codes, bits)
  # The first element's bits, not a computed value: exact even for subnormals that arithmetic flushes.
  payload = jnp.where(constant[..., None], _value_bytes(groups[..., 0], payload.shape[-1]), payload)
  return payload, lo, hi


def exact_at_one_bit(values, dtype) -> bool:
  """Whether 1-bit codes represent every group of an array taking only `values` exactly.

  A group holding one value is constant and stored exactly. A group holding both values a < b
  (finite, not subnormal) gets the bounds (a, b) if both are bfloat16 numbers; b's code is 1
  whatever the noise if (b - a) * scale >= 1 exactly (as a fused multiply-add would compute it);
  and b decodes exactly if b - a is exact in float32.
  """
  values = sorted(float(v) for v in values)
  tiny = float(np.finfo(np.float32).tiny)  # XLA:CPU flushes subnormals to zero
  if len(values) > 2 or not all(np.isfinite(v) and (v == 0 or abs(v) >= tiny) for v in values):
    return False
  if len(values) < 2:
    return True
  in_dtype = np.asarray(values, dtype)
  a, b = in_dtype.astype(np.float32)
  if not np.array_equal(in_dtype.astype(np.float64), np.asarray([a, b], np.float64)):  # not float32 numbers
    return False
  if not np.array_equal(np.asarray([a, b]).astype(jnp.dtype(jnp.bfloat16)).astype(np.float32), [a, b]):
    return False
  difference = np.float32(b - a)
  scale = np.float32(1) / max(difference, np.float32(MIN_RANGE))
  exact = fractions.Fraction(float(difference)) == fractions.Fraction(float(b)) - fractions.Fraction(float(a))
  return (exact and np.float32(a + difference) == b and float(difference) * float(scale) >= 1.0
          and scale >= tiny)  # a subnormal scale (a range above 2**126) is flushed to zero


def rounding_variance(x: jax.Array, bits: int, group_size: int = 256) -> jax.Array:
  """Per-element variance of `dequantize(quantize(x, bits, group_size))` over stochastic seeds.

  A value a fraction p of a grid step above a grid point rounds up with probability p, so its
  decoded error has variance p (1 - p) step**2, with the exact grid `quantize` uses. For bits=16
  the error is the deterministic bfloat16 rounding, whose square is returned; for 32 it is zero.
  """
  x = jnp.asarray(x)
  check_float_dtype(x.dtype)
  bits, group_size = check_bits(bits), check_group_size(group_size)
  compute = _compute_dtype(x.dtype)
  if bits == 32:
    return jnp.zeros(x.shape, compute)
  if bits == 16:
    return (x.astype(compute) - x.astype(jnp.bfloat16).astype(compute)) ** 2
  layout = Layout.of(x.shape, group_size)
  values = layout.to_groups(x).astype(compute)
  lo, hi, scale, constant = _grid(values, bits)
  scaled = (values - lo.astype(compute)[..., None]) * scale[..., None]
  frac = scaled - jnp.floor(scaled)
  step = 1 / scale[..., None]
  variance = jnp.where(constant[..., None], 0, frac * (1 - frac) * step**2)
  return layout.from_groups(variance)


def dequantize(q: QuantizedArray) -> jax.Array:
  """Restores an array of `q.shape` and `q.dtype` from a `QuantizedArray`.

  Leading axes that the leaves carry beyond the stored layout (from `vmap` over `quantize`) are
  treated as batch axes and kept in front.
  """
  if not isinstance(q, QuantizedArray):
    raise TypeError(f"dequantize expects a jact.QuantizedArray, got {type(q).__name__}.")
  if q.bits == 32:
    return q.payload
  if q.bits == 16:
    return q.payload.astype(q.dtype)
  return _dequantize_packed(q.payload, q.lo, q.hi, q.shape, jnp.dtype(q.dtype), q.bits, q.group_size)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _dequantize_packed(payload, lo, hi, shape, dtype, bits: int, group_size: int) -> jax.Array:
  layout = Layout.of(shape, group_size)
  codes = _unpack(payload, bits).astype(jnp.float32)
  lo, hi = lo.astype(jnp.float32)[..., None], hi.astype(jnp.float32)[..., None]
  values = formulas.decode_codes(codes, lo, hi, 2**bits - 1).astype(dtype)
  exact = _bytes_value(payload, dtype)[..., None]
  return layout.from_groups(jax.lax.select(jnp.broadcast_to(lo == hi, values.shape), jnp.broadcast_to(exact, values.shape), values))
