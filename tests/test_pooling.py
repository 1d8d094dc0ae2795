"""Max-pooling stores its argmax, not its input (jact.rewrites.pooling)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jact


def test_max_pool_keeps_argmax_indices_and_exact_gradients():
  """Max-pooling stores which element of each window was the maximum, one byte per output (a
  sixteenth of a 3x3/2 pool's float32 input), not its input, and its gradient is the same as
  plain autodiff's (ties included: first in row-major order)."""
  def pool(x):
    return jax.lax.reduce_window(jax.nn.relu(x), -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))
  x = jnp.round(jax.random.normal(jax.random.key(6), (2, 16, 16, 64)) * 2) / 2  # many ties
  w = jax.random.normal(jax.random.key(7), (2, 8, 8, 64))
  f = jact.remat_compress(pool, bits=2, min_size=0)
  loss = lambda fn: (lambda x: jnp.sum(fn(x) * w))
  assert jnp.array_equal(jax.grad(loss(f))(x), jax.grad(loss(pool))(x))
  table = jact.residuals(loss(f), x)
  assert any(r.dtype == jnp.uint8 and r.size == 2 * 8 * 8 * 64 for r in table)
  assert not any(r.shape == x.shape and r.bits == 32 for r in table)


def test_max_pool_over_the_batch_axis_and_at_any_batch_size():
  """The argmax is found by indices within a row of the unpooled leading axes: pooling that
  includes the batch axis keeps exact gradients, and a batch whose activation has more than 2**31
  elements traces (flat indices would overflow int32)."""
  def pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (2, 3, 1), (2, 2, 1), ((0, 0), (1, 1), (0, 0)))
  x = jnp.round(jax.random.normal(jax.random.key(8), (4, 16, 64)) * 2) / 2
  f = jact.remat_compress(pool, bits=2, min_size=0)
  loss = lambda fn: (lambda x: jnp.sum(fn(x) * jnp.arange(2 * 8 * 64.0).reshape(2, 8, 64)))
  assert jnp.array_equal(jax.grad(loss(f))(x), jax.grad(loss(pool))(x))

  def stem_pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))
  huge = jax.ShapeDtypeStruct((4096, 112, 112, 64), jnp.float32)  # 3.3e9 elements
  g = jact.remat_compress(stem_pool, bits=2)
  table = jact.residuals(lambda x: jnp.sum(g(x)), huge)
  assert any(r.dtype == jnp.uint8 and r.size == 4096 * 56 * 56 * 64 for r in table)


@pytest.mark.parametrize("window, strides, padding", [
    ((1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))),   # ResNet's stem
    ((1, 2, 2, 1), (1, 2, 2, 1), ((0, 0), (0, 0), (0, 0), (0, 0))),   # VGG's
    ((1, 3, 2, 2), (1, 1, 2, 1), ((0, 0), (2, 0), (0, 1), (1, 0))),   # uneven, pooling channels too
    ((1, 17, 16, 1), (1, 3, 4, 1), ((0, 0), (5, 5), (4, 4), (0, 0))),  # 272 elements: int32 offsets
])
def test_max_pool_gradients_are_exact_for_any_window(window, strides, padding):
  def pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, padding)
  x = jnp.round(jax.random.normal(jax.random.key(9), (2, 20, 18, 8)) * 2) / 2  # many ties
  # (A window holding only -inf, padding included, or a NaN has no defined argmax: XLA's
  # select-and-scatter gives the gradient to a padding position or a neighbour of the NaN, jact
  # to the first element or to the NaN; no such window here.)
  x = x.at[1, 5, 6, 2].set(-jnp.inf)
  w = jax.random.normal(jax.random.key(10), jax.eval_shape(pool, x).shape)
  loss = lambda fn: (lambda x: jnp.nansum(fn(x) * w))
  f = jact.remat_compress(pool, bits=2, min_size=0)
  assert jnp.array_equal(jax.grad(loss(f))(x), jax.grad(loss(pool))(x), equal_nan=True)
  (stored,) = [r for r in jact.residuals(loss(f), x) if r.name.startswith("pool/") and r.stored_nbytes]
  assert stored.dtype == (jnp.uint8 if np.prod(window) < 256 else jnp.int32)


def test_pooling_gradient_zeros_wait_for_the_cotangent():
  """The max-pooling gradient scatters into input-sized zeros. Computed from literals alone, XLA
  would schedule them at the start of the backward pass and keep them alive throughout (seen on
  XLA:GPU: ResNet-50's largest buffer). jact builds them from a scalar that leaves an
  optimization barrier together with the scattered cotangent, so they cannot exist earlier."""
  def block(x):
    return jax.lax.reduce_window(jax.nn.relu(x), -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")

  g = jact.remat_compress(block, bits=2, min_size=0)
  jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(g(x))))(jnp.ones((2, 16, 16, 8))).jaxpr
  producer, scatters = {}, []

  def walk(j):
    for eqn in j.eqns:
      producer.update((v, eqn) for v in eqn.outvars)
      if eqn.primitive.name == "scatter-add":
        scatters.append(eqn)
      for value in eqn.params.values():
        inner = getattr(value, "jaxpr", value)
        if hasattr(inner, "eqns"):
          walk(inner)

  walk(jaxpr)
  assert scatters
  for scatter in scatters:
    operand, _, updates = scatter.invars
    zeros = producer[operand]
    assert zeros.primitive.name == "broadcast_in_dim"
    source = zeros.invars[0]
    assert not hasattr(source, "val"), "built from a literal: XLA may compute the zeros first"
    barrier = producer[source]
    assert barrier.primitive.name == "optimization_barrier"
    assert updates in barrier.outvars
