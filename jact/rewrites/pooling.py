"""Max-pooling whose backward pass keeps the argmax, not the input.

Autodiff of `lax.reduce_window_max` keeps the pooled input to find each window's maximum again in
the backward pass (`select_and_scatter_add`). That use is not linear: rounding the input could
move the maximum, so jact would have to keep it at full precision, and it is a ResNet's largest
activation. Rewritten here, the forward pass records which element of its window each output
took, one byte per output for windows of up to 255 elements, and the tangent is a gather at the
indices rebuilt from it: the residual is a sixteenth of a 3x3/2 pool's float32 input, exact, and
the gradient is the same.
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

  pooled_axes = range(lead, len(windows))
  window_size = math.prod(windows[a] for a in pooled_axes)
  # Which element of its window each output took, as a mixed-radix offset: at most 255 for any
  # window of up to 255 elements, so one byte per output instead of an int32 index.
  offset_dtype = jnp.uint8 if window_size < 256 else jnp.int32

  def window_starts(shape):
    return [jax.lax.broadcasted_iota(jnp.int32, shape, a) * strides[a] - padding[a][0] for a in pooled_axes]

  def offsets(index, row_shape):
    coords, rest = [], index
    for size in reversed(row_shape):  # the picked element's coordinates within its row
      coords.append(rest % size)
      rest = rest // size
    offset = jnp.zeros(index.shape, jnp.int32)
    for a, coord, start in zip(pooled_axes, coords[::-1], window_starts(index.shape)):
      offset = offset * windows[a] + (coord - start)
    # No element picked (only the initial value): a sentinel that decodes out of range.
    return jnp.where(index >= math.prod(row_shape), window_size, offset).astype(offset_dtype)

  def indices(offset, row_shape):
    offset = offset.astype(jnp.int32)
    parts, rest = [], offset
    for a in reversed(pooled_axes):
      parts.append(rest % windows[a])
      rest = rest // windows[a]
    index = jnp.zeros(offset.shape, jnp.int32)
    for size, part, start in zip(row_shape, parts[::-1], window_starts(offset.shape)):
      index = index * size + start + part
    return jnp.where(offset == window_size, math.prod(row_shape), index)

  @jax.custom_jvp
  def pool(x):
    return argmax(x)[0]

  @pool.defjvp
  def pool_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    value, index = argmax(x)
    rows, row_shape = math.prod(x.shape[:lead]), x.shape[lead:]

    # Checkpointed, so that autodiff keeps the one-byte offsets and rebuilds the indices from them.
    @jax.checkpoint
    def gather(t, offset):
      index = indices(offset, row_shape).reshape(rows, -1)
      return jnp.take_along_axis(t.reshape(rows, -1), index, axis=1, mode="fill", fill_value=0)

    return value, gather(t, offsets(index, row_shape)).reshape(value.shape)

  return pool
