"""Equinox and Haiku code, unchanged apart from the line that adds compression (issue 18).

Gradients are compared with the same model uncompressed: at bits=32 nothing is rounded (relative
error < 1e-5, float32 rounding); at bits=8 with min_size=0 the error is the codec's noise, below
4/255 of the gradient's norm (see tests/test_composition.py for where that bound comes from) and
not zero (or nothing was compressed). Memory: XLA:CPU's compiled temp of one training step.
"""

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import optax
import pytest

import jact
from tree_math import relative_error

TOLERANCE = {32: 1e-5, 8: 4 / 255}


def check_close(bits, got, want):
  error = relative_error(got, want)
  assert error < TOLERANCE[bits], (bits, error)
  if bits < 32:
    assert error > 0, "nothing was compressed"


# --- Equinox ---------------------------------------------------------------------------------------

def mlp_and_data(width=64, depth=2, batch=64):
  model = eqx.nn.MLP(32, 8, width, depth, activation=jax.nn.gelu, key=jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (batch, 32))
  return model, x


def mlp_loss(model, x):
  return jnp.mean(jnp.tanh(jax.vmap(model)(x)))


def array_grads(grads):
  return eqx.filter(grads, eqx.is_array)


@pytest.mark.parametrize("bits", [32, 8])
def test_equinox_module_passes_through_remat_compress(bits):
  """An eqx.nn.MLP holds functions (its activation) beside its arrays: they are static, the arrays
  are kept (keep_argnums) and the batch is compressed."""
  model, x = mlp_and_data()
  loss = jact.remat_compress(mlp_loss, bits=bits, keep_argnums=(0,), min_size=0)
  got = eqx.filter_grad(lambda m, x: loss(m, x, rng=jax.random.key(0)))(model, x)
  check_close(bits, array_grads(got), array_grads(eqx.filter_grad(mlp_loss)(model, x)))


class Block(eqx.Module):
  linear: eqx.nn.Linear
  norm: eqx.nn.LayerNorm

  def __init__(self, width, key):
    self.linear = eqx.nn.Linear(width, width, key=key)
    self.norm = eqx.nn.LayerNorm(width)

  def __call__(self, x):
    return x + jax.nn.gelu(jax.vmap(self.linear)(jax.vmap(self.norm)(x)))


def blocks_loss(blocks, x):
  for block in blocks:
    x = block(x)
  return jnp.mean(jnp.sin(x))


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("form", ["class", "instance"])
def test_compress_decorates_equinox_modules(bits, form):
  """`jact.compress` on an Equinox Module class or instance compresses its `__call__`: same class
  name, fields and leaf paths (so optax, eqx.tree_serialise_leaves and checkpoints see the same
  parameters; the tree's node class is the compressed subclass), parameters kept, repeated calls
  of one class named Block, Block_1, ..."""
  keys = jax.random.split(jax.random.key(2), 3)
  blocks = [Block(64, k) for k in keys]
  if form == "class":
    compressed_class = jact.compress(Block, bits=bits, min_size=0)
    assert compressed_class.__name__ == "Block" and issubclass(compressed_class, Block)
    compressed = [compressed_class(64, k) for k in keys]
  else:
    compressed = [jact.compress(b, bits=bits, min_size=0) for b in blocks]
  paths = lambda tree: [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert paths(compressed) == paths(blocks)
  x = jax.random.normal(jax.random.key(3), (48, 64))
  with jact.use_policy(bits):
    got = eqx.filter_grad(blocks_loss)(compressed, x)
  want = eqx.filter_grad(blocks_loss)(blocks, x)
  check_close(bits, jax.tree.leaves(array_grads(got)), jax.tree.leaves(array_grads(want)))
  if bits < 32:
    names = {r.name.split("/")[0] for r in jact.residuals(blocks_loss, compressed, x)}
    assert {"Block", "Block_1", "Block_2"} <= names, names


def test_equinox_errors():
  with pytest.raises(TypeError, match="already compressed"):
    jact.compress(jact.compress(Block, bits=2), bits=2)

  class NoCall(eqx.Module):
    w: jax.Array

  with pytest.raises(TypeError, match="no __call__"):
    jact.compress(NoCall, bits=2)


def test_equinox_training_step_saves_memory():
  """eqx.filter_value_and_grad + optax: the compressed step's compiled temp is under half the
  uncompressed one's (activations dominate it; 2-bit residuals take 1/16 of their bytes)."""
  model, x = mlp_and_data(width=512, depth=4, batch=512)
  optimizer = optax.adam(1e-3)

  def make_step(loss_fn):
    @eqx.filter_jit
    def step(model, opt_state, x):
      loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x)
      updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
      return eqx.apply_updates(model, updates), opt_state, loss
    return step

  opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
  compressed = jact.remat_compress(mlp_loss, bits=2, keep_argnums=(0,))
  plain_step, compressed_step = make_step(mlp_loss), make_step(compressed)
  # Not the filter_jit step itself: jact.memory.compiled filters the model's functions out as
  # filter_jit does, and compiles with jax.jit.
  temps = [jact.memory.compiled(lambda m, s, x: step(m, s, x), model, opt_state, x).temp
           for step in (plain_step, compressed_step)]
  assert temps[1] < 0.5 * temps[0], temps
  new_model, _, loss = compressed_step(model, opt_state, x)  # and it runs
  assert jnp.isfinite(loss) and jax.tree.structure(new_model) == jax.tree.structure(model)
  assert relative_error(array_grads(new_model), array_grads(plain_step(model, opt_state, x)[0])) < 1e-2


# --- Haiku -----------------------------------------------------------------------------------------

def haiku_net(x, is_training):
  for width in (32, 32):
    x = hk.Conv2D(width, 3)(x)
    x = hk.BatchNorm(True, True, 0.9)(x, is_training)
    x = jax.nn.relu(x)
  return hk.Linear(4)(jnp.mean(x, (1, 2)))


def haiku_setup(batch=16, size=16):
  model = hk.transform_with_state(haiku_net)
  x = jax.random.normal(jax.random.key(4), (batch, size, size, 3))
  params, state = model.init(jax.random.key(5), x, True)

  def loss(params, state, x):
    out, new_state = model.apply(params, state, None, x, True)
    return jnp.mean(jnp.sin(out)), new_state
  return loss, params, state, x


@pytest.mark.parametrize("bits", [32, 8])
def test_haiku_with_batchnorm_state(bits):
  """The whole loss of a transform_with_state model, parameters and state kept: gradients within
  the codec's noise and BatchNorm's new state exact (the forward pass is never rounded)."""
  loss, params, state, x = haiku_setup()
  compressed = jact.remat_compress(loss, bits=bits, keep_argnums=(0, 1), min_size=0)
  (got, got_state) = jax.grad(lambda p: compressed(p, state, x, rng=jax.random.key(0)), has_aux=True)(params)
  (want, want_state) = jax.grad(lambda p: loss(p, state, x), has_aux=True)(params)
  check_close(bits, got, want)
  assert relative_error(got_state, want_state) < 1e-6


def test_haiku_training_step_saves_memory():
  loss, params, state, x = haiku_setup(batch=64, size=32)
  compressed = jact.remat_compress(loss, bits=2, keep_argnums=(0, 1))

  def step(loss_fn):
    return jax.jit(lambda p, s, x: jax.grad(loss_fn, has_aux=True)(p, s, x))

  temps = [jact.memory.compiled(step(f), params, state, x).temp for f in (loss, compressed)]
  assert temps[1] < 0.5 * temps[0], temps


def test_haiku_modules_inside_a_compressed_call_are_an_error():
  """Creating Haiku parameters inside a compressed call would leak jact's tracers into Haiku's
  frame: a clear error. A compressed function of arrays alone is fine inside hk.transform."""
  def leaking(x):
    return jnp.sum(jact.remat_compress(lambda h: hk.Linear(4)(h), bits=8)(x))

  with pytest.raises(TypeError, match="Haiku parameters"):
    hk.transform(leaking).init(jax.random.key(0), jnp.ones((2, 3)))

  def fine(x):
    return jnp.sum(jact.remat_compress(jax.nn.gelu, bits=8, min_size=0)(hk.Linear(4)(x)) ** 2)

  model = hk.transform(fine)
  params = model.init(jax.random.key(0), jnp.ones((2, 3)))
  grads = jax.grad(model.apply)(params, None, jnp.ones((2, 3)))
  assert jax.tree.structure(grads) == jax.tree.structure(params)
