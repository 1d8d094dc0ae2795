"""Bitwise comparison of two codec implementations, and the groups that exercise every special case.

Shared by tests/test_kernels.py (interpret mode, on CPU) and benchmarks/gpu/kernels.py (compiled,
on a GPU), so that both check the same property on the same inputs: the kernels store and restore
the reference's bits. A NaN matches any NaN, since XLA leaves NaN payloads unspecified.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jact import codec


def differs(actual, expected) -> np.ndarray:
  """Elementwise: whether the bit patterns differ (a NaN matches any NaN)."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  if actual.shape != expected.shape or actual.dtype != expected.dtype:
    raise ValueError(f"Cannot compare {actual.dtype}{actual.shape} with {expected.dtype}{expected.shape}.")
  if not jnp.issubdtype(actual.dtype, jnp.floating):
    return actual != expected
  as_bits = np.dtype(f"uint{8 * actual.dtype.itemsize}")
  nan_actual, nan_expected = np.isnan(actual), np.isnan(expected)
  return np.where(nan_actual | nan_expected, nan_actual != nan_expected,
                  actual.view(as_bits) != expected.view(as_bits))


def group_differences(actual: codec.QuantizedArray, expected: codec.QuantizedArray) -> dict[str, np.ndarray]:
  """Per group (of `group_shape`): whether its payload bytes, its lo or its hi differ."""
  static = lambda q: (q.shape, jnp.dtype(q.dtype), q.bits, q.group_size)
  if static(actual) != static(expected):
    raise ValueError(f"Cannot compare {actual} with {expected}.")
  return {"payload": differs(actual.payload, expected.payload).any(-1),
          "lo": differs(actual.lo, expected.lo), "hi": differs(actual.hi, expected.hi)}


def special_groups(dtype, group_size: int, ordinary: int = 4) -> dict[str, np.ndarray]:
  """Kind of group -> (groups, group_size) float32 rows to cast to `dtype` (extremes from its range).

  `ordinary` random groups, then one group for each case the codec treats specially: constant
  groups (stored exactly), NaN and Inf groups (non-finite bounds), ranges that overflow, small
  ranges far from zero, and subnormals (which CPUs flush in arithmetic).
  """
  rng = np.random.default_rng(0)
  big = 0.9 * float(jnp.finfo(dtype).max)
  tiny = float(jnp.finfo(dtype).smallest_subnormal)

  def group(*values):
    return np.resize(np.asarray(values, np.float32), (1, group_size))

  return {
      "ordinary": (3 * rng.standard_normal((ordinary, group_size))).astype(np.float32),
      "constant": group(2.5),
      "signed_zeros": group(0.0, -0.0),
      "constant_inf": group(np.inf),
      "nan": group(1.0, np.nan, -2.0),
      "inf": group(1.0, np.inf, -2.0),
      "both_infs": group(-np.inf, 3.0, np.inf),
      "overflowing_range": group(-big, big, 0.5 * big),
      "small_range": group(1000.0, 1000.5, 1001.0),
      "subnormal": group(0.0, tiny, 3 * tiny, -2 * tiny),
  }
