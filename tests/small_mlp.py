"""A small GELU MLP and the error measure shared by the transform tests."""

import functools

import jax
import jax.numpy as jnp

import jact

WIDTH, BATCH, DEPTH = 128, 256, 4


def layer(x, w):
  return jax.nn.gelu(x @ w)


def conv_layer(x, k):
  y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.tanh(y) * jax.nn.sigmoid(y)


@functools.lru_cache()
def mlp_data():
  key = jax.random.key(0)
  ws = [jax.random.normal(jax.random.fold_in(key, i), (WIDTH, WIDTH)) / WIDTH**0.5 for i in range(DEPTH)]
  return ws, jax.random.normal(key, (BATCH, WIDTH))


def mlp_loss(f):
  def loss(ws, x, **kw):
    for w in ws:
      x = f(x, w, **kw)
    return jnp.mean(x**2)
  return loss


def rel_err(a, b):
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return (num / sum(float(jnp.sum(y**2)) for y in jax.tree.leaves(b))) ** 0.5


def compressed(bits, **kw):
  return jact.remat_compress(layer, bits=bits, keep_argnums=(1,), min_size=0, **kw)


def exact_grads():
  ws, x = mlp_data()
  return jax.grad(mlp_loss(layer))(ws, x)

