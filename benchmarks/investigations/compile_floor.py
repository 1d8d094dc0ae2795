"""How fast could a compressed step compile? The MLP of tests/test_memory.py (`jact.models.mlp`)
with jact's codec, and with a codec stripped to the least work any per-group quantiser needs.

  python benchmarks/investigations/compile_floor.py              # 16 layers, best of 5 compiles each
  python benchmarks/investigations/compile_floor.py --depth 16 --repeats 7

XLA:CPU compiles each distinct kernel once, however many identical layers use it, and a kernel
costs tens of milliseconds (MLIR emission plus LLVM), while the whole uncompressed 16-layer step
compiles in about 0.1 s. The "stripped" codec is NOT a valid codec -- an experiment only: each
residual is written to memory first (so that all same-shaped residuals share one reduction and
one quantisation kernel), each layer's seed is an operand rather than a constant folded into the
kernel, the group's float32 min/max are truncated into one uint32 that the decoding reads (no bfloat16
rounding, so the grid may not cover the group), there is no exact path for constant groups and
the scale is a Newton reciprocal (no division kernel). What it compiles in bounds what rearranging the real
codec's kernels could reach.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jact.codec import formulas, hashing
from jact.codec import reference as codec  # the jnp codec, whose packed quantise/dequantise _codec swaps
from jact.models.mlp import lowered  # the MLP of tests/test_memory.py, as benchmarks/compile_time.py lowers it


def _reciprocal(d: jax.Array) -> jax.Array:
  """1 / d for positive normal float32 d from multiplications only (bit-trick guess, 3 Newton steps)."""
  r = jax.lax.bitcast_convert_type(np.uint32(0x7EF311C3) - jax.lax.bitcast_convert_type(d, jnp.uint32), jnp.float32)
  for _ in range(3):
    r = r * (np.float32(2) - d * r)
  return r


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _stripped_quantize(x, seed, bits: int, group_size: int, rounding: str):
  x, seed = jax.lax.optimization_barrier((x, seed))
  layout = codec.Layout.of(x.shape, group_size)
  values = layout.to_groups(x).astype(jnp.float32)
  inf = np.float32(np.inf)
  lo, hi = jax.lax.reduce((values, values), (inf, -inf),
                          lambda a, b: (jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1])), (values.ndim - 1,))
  to_bits = lambda v: jax.lax.bitcast_convert_type(v, jnp.uint32)
  meta = (to_bits(lo) >> 16) | (to_bits(hi) & np.uint32(0xFFFF0000))  # the stored 32 bits per group
  lo = jax.lax.bitcast_convert_type(meta << 16, jnp.float32)
  hi = jax.lax.bitcast_convert_type(meta & np.uint32(0xFFFF0000), jnp.float32)
  levels = 2**bits - 1
  scale = levels * _reciprocal(jnp.maximum(hi - lo, np.float32(codec.MIN_RANGE)))
  index = jnp.arange(layout.num_groups * group_size, dtype=jnp.uint32).reshape(values.shape)
  noise = hashing.uniform(hashing.seed_key(seed), index, hashing.value_bits(values), np.float32)
  codes = formulas.quantize_codes(values, lo[..., None], scale[..., None], noise, levels)
  return codec._pack(codes, bits), meta, meta  # the one uint32 stands for both bounds


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _stripped_dequantize(payload, meta, _, shape, dtype, bits: int, group_size: int):
  lo = jax.lax.bitcast_convert_type(meta << 16, jnp.float32)[..., None]
  hi = jax.lax.bitcast_convert_type(meta & np.uint32(0xFFFF0000), jnp.float32)[..., None]
  codes = codec._unpack(payload, bits).astype(jnp.float32)
  return codec.Layout.of(shape, group_size).from_groups(formulas.decode_codes(codes, lo, hi, 2**bits - 1).astype(dtype))


@contextlib.contextmanager
def _codec(stripped: bool):
  real = codec._quantize_packed, codec._dequantize_packed
  if stripped:
    codec._quantize_packed, codec._dequantize_packed = _stripped_quantize, _stripped_dequantize
  try:
    yield
  finally:
    codec._quantize_packed, codec._dequantize_packed = real


def compile_seconds(bits: int | None, depth: int) -> float:
  jax.clear_caches()  # traced afresh: jact caches plans by function, JAX executables by lowering
  step = lowered(bits, depth)
  start = time.perf_counter()
  step.compile()
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--depth", type=int, default=16)
  parser.add_argument("--bits", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  variants = {"baseline": (None, False), f"jact {args.bits} bits": (args.bits, False),
              f"stripped codec {args.bits} bits": (args.bits, True)}
  best = {name: float("inf") for name in variants}
  for _ in range(args.repeats):  # interleaved: the machine is shared
    for name, (bits, stripped) in variants.items():
      with _codec(stripped):
        best[name] = min(best[name], compile_seconds(bits, args.depth))
  base = best["baseline"]
  for name, seconds in best.items():
    print(f"{name:>24}: {seconds:.3f} s ({seconds / base:.2f}x)")


if __name__ == "__main__":
  main()
