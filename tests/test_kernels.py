"""The Pallas codec kernels store and restore bitwise what the jnp reference does.

The property is exact equality, not a tolerance: the kernels exist to be a faster path to the
same bits, so payload, lo, hi and decoded values are compared bit for bit (a NaN is compared as
"NaN here too", since XLA does not specify NaN payloads). Kernels run in Pallas' interpret mode on
CPU; `test_kernels_lower_to_triton_for_gpu` checks that they also lower for a GPU, without one.
benchmarks/gpu/kernels.py checks the same property compiled on a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jact import codec
from jact.codec import formulas
from jact.kernels import bitwise, supports
from jact.kernels.pallas_codec import dequantize_pallas, quantize_pallas

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
BITS = [1, 2, 4, 8]
SEEDS = [0, 12345]


def assert_same_bits(actual, expected):
  differ = bitwise.differs(actual, expected)
  assert not differ.any(), f"{differ.sum()} of {differ.size} elements differ, first at {np.argwhere(differ)[0]}"


def assert_same_quantized(actual: codec.QuantizedArray, expected: codec.QuantizedArray):
  for leaf, differ in bitwise.group_differences(actual, expected).items():
    assert not differ.any(), f"{leaf} differs in groups {np.argwhere(differ).tolist()}"


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_and_dequantize_match_reference(dtype, bits, rounding):
  x = jnp.asarray(np.concatenate(list(bitwise.special_groups(dtype, 64).values())), dtype)
  for seed in SEEDS:
    expected = codec.quantize(x, bits, 64, rounding, seed)
    actual = quantize_pallas(x, bits, 64, rounding, seed, interpret=True)
    assert_same_quantized(actual, expected)
    assert_same_bits(dequantize_pallas(actual, interpret=True), codec.dequantize(expected))


# Every dtype and every bit width once (all pairs run at group size 64 above).
@pytest.mark.parametrize("dtype, bits", [(jnp.float32, 1), (jnp.bfloat16, 2), (jnp.float16, 4),
                                         (jnp.float32, 8)])
def test_group_size_256_and_padded_tail_match_reference(dtype, bits):
  # 1155 values: no trailing product is a multiple of 256, so the fallback layout pads the tail.
  x = jnp.asarray(5 * np.random.default_rng(bits).standard_normal((3, 5, 7, 11)), dtype)
  assert codec.Layout.of(x.shape, 256).lead == 0
  expected = codec.quantize(x, bits, 256, "stochastic", 7)
  actual = quantize_pallas(x, bits, 256, "stochastic", 7, interpret=True)
  assert_same_quantized(actual, expected)
  assert_same_bits(dequantize_pallas(actual, interpret=True), codec.dequantize(expected))


def test_partial_last_block_matches_reference():
  # 5 groups in blocks of 4: the last program reads and writes past the end, masked.
  x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 128)), jnp.float32)
  expected = codec.quantize(x, 2, 128, "stochastic", 3)
  actual = quantize_pallas(x, 2, 128, "stochastic", 3, interpret=True, block_rows=4)
  assert_same_quantized(actual, expected)
  assert_same_bits(dequantize_pallas(actual, interpret=True, block_rows=4), codec.dequantize(expected))


def test_vmap_matches_reference():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 2, 128)), jnp.bfloat16)
  seeds = jnp.arange(3)
  expected = jax.vmap(lambda x, s: codec.quantize(x, 4, 64, "stochastic", s))(x, seeds)
  actual = jax.vmap(lambda x, s: quantize_pallas(x, 4, 64, "stochastic", s, interpret=True))(x, seeds)
  assert_same_quantized(actual, expected)
  # Leaves batched by vmap, decoded outside it: the batch axes stay in front, as in the reference.
  assert_same_bits(dequantize_pallas(actual, interpret=True), codec.dequantize(expected))


def test_nan_groups_decode_non_finite_at_large_group_size():
  # The codec's contract, checked on the kernel alone: XLA:CPU's row-wise min/max of an (8, 512)
  # or wider float32 array drops NaN, so the jnp reference misses it there (see jact/codec/formulas.py).
  x = np.ones((8, 1024), np.float32)
  x[2, 5] = np.nan
  q = quantize_pallas(jnp.asarray(x), 2, 1024, interpret=True)
  assert np.isnan(np.asarray(q.lo, np.float32)[2]) and np.isnan(np.asarray(q.hi, np.float32)[2])
  decoded = np.asarray(dequantize_pallas(q, interpret=True))
  assert np.isnan(decoded[2]).all() and np.isfinite(np.delete(decoded, 2, axis=0)).all()


@pytest.mark.parametrize("shape", [(), (0, 64), (3,)])
def test_small_and_empty_shapes_match_reference(shape):
  x = jnp.asarray(np.arange(np.prod(shape, dtype=int)).reshape(shape) - 1.5, jnp.float32)
  expected = codec.quantize(x, 2, 64, "stochastic", 0)
  actual = quantize_pallas(x, 2, 64, "stochastic", 0, interpret=True)
  assert_same_quantized(actual, expected)
  assert_same_bits(dequantize_pallas(actual, interpret=True), codec.dequantize(expected))


@pytest.mark.parametrize("direction", [-1.0, 1.0])
def test_bf16_toward_matches_nextafter(direction):
  # Every bfloat16 value and its float32 neighbours within 3 ulps: each rounding case and edge.
  bf16_patterns = np.arange(2**16, dtype=np.uint32) << 16
  values = (bf16_patterns[:, None].astype(np.int64) + np.arange(-3, 4)).ravel()
  values = jnp.asarray((values % 2**32).astype(np.uint32).view(np.float32))
  expected = jax.jit(lambda v: _nextafter_toward(v, direction))(values)
  assert_same_bits(jax.jit(lambda v: formulas.bf16_toward(v, direction))(values), expected)


def _nextafter_toward(value, direction):
  """Directed rounding to bfloat16 with jnp.nextafter, independent of `formulas`."""
  rounded = value.astype(jnp.bfloat16)
  back = rounded.astype(jnp.float32)
  wrong_side = back > value if direction < 0 else back < value
  return jnp.where(wrong_side, jnp.nextafter(rounded, jnp.bfloat16(direction * jnp.inf)), rounded)


def test_supports_and_errors():
  assert supports(jnp.bfloat16, 2, 256) and supports(jnp.float16, 8, 64)
  assert not supports(jnp.float64, 2, 256)
  assert not supports(jnp.float32, 16, 256)
  assert not supports(jnp.float32, 2, 192)
  x = jnp.ones((4, 256), jnp.float32)
  with pytest.raises(ValueError, match="power-of-two group_size"):
    quantize_pallas(x, 2, 192)
  with pytest.raises(ValueError, match="bits in"):
    quantize_pallas(x, 16, 256)
  with pytest.raises(ValueError, match="block_rows"):
    quantize_pallas(x, 2, 256, block_rows=3)
  with pytest.raises(TypeError, match="QuantizedArray"):
    dequantize_pallas(x)


def _lower_for_gpu(fn, *args) -> str:
  """StableHLO of `fn` lowered for CUDA on an abstract H200: runs the Pallas Triton lowering."""
  pytest.importorskip("jax._src.lib.triton")
  device = jax.sharding.AbstractDevice("NVIDIA H200", 132, "gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("dtype, bits", [(jnp.float32, 1), (jnp.float32, 2), (jnp.bfloat16, 4),
                                         (jnp.float16, 8)])
def test_kernels_lower_to_triton_for_gpu(dtype, bits):
  x = jax.ShapeDtypeStruct((64, 512), dtype)
  quantized = _lower_for_gpu(lambda x: quantize_pallas(x, bits, 256, "stochastic", 0, interpret=False), x)
  q = jax.eval_shape(lambda x: codec.quantize(x, bits, 256), x)
  dequantized = _lower_for_gpu(lambda q: dequantize_pallas(q, interpret=False), q)
  assert "triton" in quantized and "triton" in dequantized
