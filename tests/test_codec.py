"""The codec: error bounds, unbiasedness, exact cases, byte counts and errors, from its maths.

For bits b and a group with stored bounds lo', hi' (bfloat16, rounded outward), the grid step is
step = (hi' - lo') / (2**b - 1). Stochastic rounding moves each value to one of the two grid
points around it, so |x_hat - x| <= step; nearest rounding to the closer one, so <= step / 2.
Arithmetic in float32 adds a few ulps of max(|lo'|, |hi'|), and a float16/bfloat16 output adds half
an ulp of the value.
"""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jact
from jact import codec

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
BITS = [1, 2, 4, 8]


def group_bounds(q: jact.QuantizedArray):
  """Per-element (lo', hi') of its group, in the original shape, as float64 numpy."""
  layout = q.layout
  lo = np.asarray(q.lo, np.float64)[..., None] * np.ones(layout.group_size)
  hi = np.asarray(q.hi, np.float64)[..., None] * np.ones(layout.group_size)
  return (np.asarray(layout.from_groups(jnp.asarray(lo))), np.asarray(layout.from_groups(jnp.asarray(hi))))


def assert_within_bound(x, q, rounding):
  x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  x_hat = np.asarray(jnp.asarray(jact.dequantize(q), jnp.float32), np.float64)
  lo, hi = group_bounds(q)
  constant = lo == hi  # constant groups are stored exactly...
  # ...up to subnormals, which XLA:CPU flushes to zero in comparisons (a group of 0 and 1e-40 is constant)
  assert np.all(np.abs(x_hat[constant] - x64[constant]) < np.finfo(np.float32).tiny)
  step = (hi - lo) / (2**q.bits - 1)
  bound = step if rounding == "stochastic" else step / 2
  # Below the codec's floor on the range the grid is coarser than the group: x_hat stays in [lo', hi'].
  bound = np.where(hi - lo < codec.MIN_RANGE, hi - lo, bound)
  arithmetic = 4 * np.finfo(np.float32).eps * np.maximum(np.abs(lo), np.abs(hi))
  # The decoded value is rounded to x's dtype: relative to its own magnitude, which may exceed |x|.
  output = np.maximum(np.abs(x64), np.abs(x_hat)) * float(jnp.finfo(q.dtype).eps)
  flushed = np.finfo(np.float32).tiny  # subnormals, flushed to zero by XLA:CPU arithmetic
  assert np.all(np.abs(x_hat - x64) <= bound + arithmetic + output + flushed)
  # The stored bounds enclose the group and exceed its true range only by bfloat16 rounding.
  varied = ~constant
  assert np.all(lo[varied] <= x64[varied] + flushed) and np.all(x64[varied] <= hi[varied] + flushed)
  bf16_ulp = 2.0**-7 * np.maximum(np.abs(lo), np.abs(hi))
  exact_lo, exact_hi = _group_min_max(x64, q)
  assert np.all((lo >= exact_lo - bf16_ulp)[varied]) and np.all((hi <= exact_hi + bf16_ulp)[varied])


def _group_min_max(x64, q):
  groups = np.asarray(q.layout.to_groups(jnp.asarray(x64)))
  lo = groups.min(-1, keepdims=True) * np.ones(q.group_size)
  hi = groups.max(-1, keepdims=True) * np.ones(q.group_size)
  return np.asarray(q.layout.from_groups(jnp.asarray(lo))), np.asarray(q.layout.from_groups(jnp.asarray(hi)))


shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), bits=st.sampled_from(BITS), rounding=st.sampled_from(codec.ROUNDINGS),
       group_size=st.sampled_from([64, 256]), dtype=st.sampled_from(DTYPES))
def test_error_within_bound(data, bits, rounding, group_size, dtype):
  shape = data.draw(shapes)
  values = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-1e4, 1e4, width=32)))
  x = jnp.asarray(values, dtype)
  q = jact.quantize(x, bits=bits, group_size=group_size, rounding=rounding, seed=data.draw(st.integers(0, 2**32 - 1)))
  assert q.shape == x.shape and q.dtype == x.dtype
  x_hat = jact.dequantize(q)
  assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
  if x.size:
    assert_within_bound(x, q, rounding)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rounding", codec.ROUNDINGS)
@pytest.mark.parametrize("tiny", [1.4e-34, 1e-36, 3e-38])
def test_groups_with_tiny_ranges_stay_within_bound(bits, rounding, tiny):
  # Ranges near and below the codec's floor on the range (a case hypothesis once found).
  x = jnp.array([0.0, tiny, tiny / 3], jnp.float32)
  assert_within_bound(x, jact.quantize(x, bits=bits, rounding=rounding, group_size=64, seed=3), rounding)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, bits=st.sampled_from(BITS), group_size=st.sampled_from([64, 128, 256]))
def test_exact_byte_count(shape, bits, group_size):
  x = jnp.zeros(shape, jnp.float32)
  q = jact.quantize(x, bits=bits, group_size=group_size)
  groups = q.layout.num_groups
  assert groups == math.ceil(x.size / group_size) or q.layout.lead > 0
  assert q.nbytes == groups * group_size * bits // 8 + 4 * groups
  assert q.nbytes == codec.stored_nbytes(shape, jnp.float32, bits, group_size)


def test_metadata_costs_an_eighth_of_a_bit_at_group_256():
  x = jnp.ones((64, 1024))
  for bits in BITS:
    q = jact.quantize(x, bits=bits)
    assert (8 * q.nbytes - bits * x.size) / x.size == 0.125


@pytest.mark.parametrize("bits", BITS)
def test_stochastic_rounding_is_unbiased(bits):
  """The mean of K decodings approaches x like 1/sqrt(K), with the Bernoulli variance predicted.

  A value a fraction p of a step above a grid point rounds up with probability p, so the decoded
  error has variance p(1-p) step**2; the mean over K independent seeds has 1/K of it.
  """
  x = jax.random.normal(jax.random.key(0), (16, 256))
  decoded = jnp.stack([jact.dequantize(jact.quantize(x, bits, seed=s)) for s in range(256)])
  q = jact.quantize(x, bits)
  lo, hi = group_bounds(q)
  step = (hi - lo) / (2**bits - 1)
  frac = np.mod((np.asarray(x, np.float64) - lo) / step, 1.0)
  predicted_var = frac * (1 - frac) * step**2
  for k in (16, 256):
    err = np.asarray(decoded[:k].mean(0), np.float64) - np.asarray(x, np.float64)
    rms, predicted = np.sqrt(np.mean(err**2)), np.sqrt(np.mean(predicted_var) / k)
    # 4096 nearly independent errors: the RMS estimate is within a few percent of its expectation.
    assert abs(rms / predicted - 1) < 0.1, (k, rms, predicted)


def test_seeds_are_reproducible_and_independent():
  x = jax.random.normal(jax.random.key(1), (64, 256))
  a, b = jact.quantize(x, 2, seed=7), jact.quantize(x, 2, seed=7)
  assert jnp.array_equal(a.payload, b.payload)
  err0 = np.asarray(jact.dequantize(jact.quantize(x, 2, seed=0)) - x).ravel()
  err1 = np.asarray(jact.dequantize(jact.quantize(x, 2, seed=1)) - x).ravel()
  # Errors of independent seeds are uncorrelated beyond their shared dependence on frac(x):
  # subtract the conditional mean (zero: unbiased) and compare with the 1/sqrt(n) noise floor.
  corr = np.corrcoef(err0, err1)[0, 1]
  assert abs(corr) < 4 / np.sqrt(err0.size)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_constant_groups_round_trip_exactly(dtype, bits):
  for value in (0.1, -3.3e-5, 7.0, 0.0, 1e4):
    x = jnp.full((3, 256), value, dtype)
    assert jnp.array_equal(jact.dequantize(jact.quantize(x, bits)), x)


def test_constant_float64_round_trips_exactly():
  with jax.enable_x64(True):
    x = jnp.full((300,), 0.1, jnp.float64)
    for bits in BITS:
      y = jact.dequantize(jact.quantize(x, bits))
      assert y.dtype == jnp.float64 and jnp.array_equal(y, x)


@pytest.mark.parametrize("bits", BITS)
def test_zero_one_masks_are_lossless(bits):
  mask = (jax.random.uniform(jax.random.key(2), (8, 512)) > 0.5).astype(jnp.float32)
  assert jnp.array_equal(jact.dequantize(jact.quantize(mask, bits)), mask)


bf16_numbers = st.one_of(
    st.sampled_from([0.0, 1.0, 2.0, 0.5, -1.0, 3.0, 1e-3]),
    st.integers(0, 0xFFFF).map(lambda b: float(np.uint16(b).view(jnp.bfloat16))).filter(np.isfinite))


@settings(max_examples=60, deadline=None)
@given(a=bf16_numbers, b=bf16_numbers, dtype=st.sampled_from(DTYPES), rounding=st.sampled_from(codec.ROUNDINGS))
def test_two_values_judged_exact_round_trip_exactly_at_1_bit(a, b, dtype, rounding):
  """`exact_at_one_bit` decides that masks are stored at 1 bit: when it says so, every mix of the
  two values comes back bitwise, whatever the seed."""
  with np.errstate(over="ignore"):  # bfloat16 numbers beyond float16's range become inf: rejected
    values = np.asarray([a, b], dtype)
  if not codec.exact_at_one_bit(values.tolist(), dtype):
    return
  pattern = jax.random.bernoulli(jax.random.key(7), 0.5, (6, 256)).at[0].set(True).at[1].set(False)
  x = jnp.where(pattern, jnp.asarray(values[1]), jnp.asarray(values[0]))
  for seed in range(3):
    assert jnp.array_equal(jact.dequantize(jact.quantize(x, 1, rounding=rounding, seed=seed)), x)


@pytest.mark.parametrize("values, exact", [((0.0, 1.0), True), ((0.0, 2.0), True), ((0.25, 1.0), True),
                                           ((-3.0, 5.0), True), ((7.0,), True), ((0.0, 1 / 0.9), False),
                                           ((0.0, 0.01), False), ((0.0, np.inf), False), ((0.0, 1.0, 2.0), False),
                                           ((-1.0, 2.0**-126), False),  # b - a rounds to 1
                                           ((0.0, 2.0**127), False)])  # 1 / (b - a) is subnormal
def test_exact_at_one_bit_accepts_bfloat16_pairs_only(values, exact):
  assert codec.exact_at_one_bit(values, jnp.float32) == exact


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("bits", BITS)
def test_non_finite_values_stay_non_finite(bad, bits):
  x = jax.random.normal(jax.random.key(3), (4, 256)).at[1, 17].set(bad)
  y = jact.dequantize(jact.quantize(x, bits))
  assert not jnp.isfinite(y[1, 17])
  assert not jnp.all(jnp.isfinite(y[1]))  # its group is marked
  assert jnp.all(jnp.isfinite(y[jnp.array([0, 2, 3])]))  # other groups are untouched


@pytest.mark.parametrize("bits", [16, 32])
def test_wide_formats(bits):
  x = jax.random.normal(jax.random.key(4), (5, 7))
  q = jact.quantize(x, bits)
  y = jact.dequantize(q)
  expected = x if bits == 32 else x.astype(jnp.bfloat16).astype(x.dtype)
  assert jnp.array_equal(y, expected) and q.nbytes == x.size * bits // 8


def test_scalars_and_empty_arrays():
  assert jact.dequantize(jact.quantize(jnp.float32(2.5), 4)) == 2.5  # a constant group
  empty = jact.quantize(jnp.zeros((0, 3)), 2)
  assert empty.nbytes == 0 and jact.dequantize(empty).shape == (0, 3)


def test_works_under_jit_and_vmap():
  x = jax.random.normal(jax.random.key(5), (3, 8, 256))
  eager = jact.quantize(x, 4, seed=3)
  jitted = jax.jit(lambda x: jact.quantize(x, 4, seed=3))(x)
  assert jnp.array_equal(eager.payload, jitted.payload)
  assert jnp.array_equal(jax.jit(jact.dequantize)(eager), jact.dequantize(eager))
  batched = jax.vmap(lambda row: jact.quantize(row, 4))(x)
  y = jact.dequantize(batched)
  assert y.shape == x.shape
  assert_within_bound(x[0], jact.quantize(x[0], 4), "stochastic")
  assert jnp.allclose(y, jax.vmap(lambda row: jact.dequantize(jact.quantize(row, 4)))(x))


def test_clear_errors():
  with pytest.raises(TypeError, match="floating-point"):
    jact.quantize(jnp.arange(4), 2)
  with pytest.raises(ValueError, match=r"bits=3 .*\(1, 2, 4, 8, 16, 32\)"):
    jact.quantize(jnp.ones(4), 3)
  with pytest.raises(ValueError, match="group_size=100 must be a positive multiple of 64"):
    jact.quantize(jnp.ones(4), 2, group_size=100)
  with pytest.raises(ValueError, match="rounding='up'"):
    jact.quantize(jnp.ones(4), 2, rounding="up")
  with pytest.raises(TypeError, match="QuantizedArray"):
    jact.dequantize(jnp.ones(4))
