"""Max-pooling whose backward pass keeps the argmax, not the input.

Autodiff of `lax.reduce_window_max` keeps the pooled input to find each window's maximum again in
the backward pass (`select_and_scatter_add`). That use is not linear: rounding the input could
move the maximum, so jact would have to keep it at full precision, and it is a ResNet's largest
activation. Rewritten here, the forward pass records each window's argmax as an integer index and
the tangent is a gather at those indices: the residual is the index (a quarter of the input's
size for a 3x3/2 pool), exact, and the gradient is the same.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

PRIMITIVE = "reduce_window_max"


def _unpooled_lead(params) -> int:
  """How many leading axes (the batch) pooling leaves alone: window 1, stride 1, no padding."""
  lead = 0
  for window, stride, pad in zip(params["window_dimensions"], params["window_strides"], params["padding"]):
    if (window, stride, tuple(pad)) != (1, 1, (0, 0)):
      break
    lead += 1
  return lead


def applies(eqn) -> bool:
  """A max-pooling equation over a floating-point array with no dilation, whose argmax indices
  within one row of the unpooled leading axes fit in int32."""
  if eqn.primitive.name != PRIMITIVE or not jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating):
    return False
  params = eqn.params
  ones = (1,) * len(params["window_dimensions"])
  row = math.prod(eqn.invars[0].aval.shape[_unpooled_lead(params):])
  return (params.get("base_dilation", ones) == ones and params.get("window_dilation", ones) == ones
          and row < np.iinfo(np.int32).max)


def rewrite(eqn):
  """`eqn` as a function of its operand whose autodiff keeps the argmax indices."""
  params = eqn.params
  windows, strides, padding = params["window_dimensions"], params["window_strides"], params["padding"]
  # Indices count within a row of the leading axes that pooling leaves alone (the batch), so that
  # they fit in int32 at any batch size.
  lead = _unpooled_lead(params)

  def argmax(x):
    index = jnp.zeros(x.shape, jnp.int32)
    for axis in range(lead, x.ndim):  # row-major index of every element within its row
      index = index * x.shape[axis] + jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    low = np.array(-np.inf, x.dtype)

    def pick(a, b):  # the larger value; on ties the first in row-major order, like XLA's `ge` select
      a_value, a_index = a
      b_value, b_index = b
      take_b = (b_value > a_value) | ((b_value == a_value) & (b_index < a_index)) | jnp.isnan(b_value)
      return jnp.where(take_b, b_value, a_value), jnp.where(take_b, b_index, a_index)

    return jax.lax.reduce_window((x, index), (low, np.int32(math.prod(x.shape[lead:]))), pick, windows, strides,
                                 padding)

  @jax.custom_jvp
  def pool(x):
    return argmax(x)[0]

  @pool.defjvp
  def pool_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    value, index = argmax(x)
    rows = math.prod(x.shape[:lead])
    picked = jnp.take_along_axis(t.reshape(rows, -1), index.reshape(rows, -1), axis=1, mode="fill", fill_value=0)
    return value, picked.reshape(value.shape)

  return pool
