"""Tests for the Flax integration: jact.compressed / jact.compress for linen, NNX and functions."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits

import jact

from tree_math import relative_error, tree_norm

BATCH, SIDE, CHANNELS, CLASSES = 4, 8, 8, 10

# Gradient tolerance at 8 bits, from the codec's error bound. Per group, stochastic rounding moves
# an element by at most one step = (hi' - lo') / 255, where hi' - lo' <= (hi - lo)(1 + 2**-8)
# after rounding the ends outward to bfloat16, and hi - lo <= 2 max|x|: a residual's error is at
# most EPS_8 = 2 (1 + 2**-8) / 255 relative to its group's largest magnitude. The backward pass
# multiplies residuals; to first order the relative errors of the factors of a product add, so a
# gradient that passes through k compressed residuals is off by at most k * EPS_8 relative to its
# norm (unbiased rounding makes the typical error far smaller). k is bounded by the number of
# compressed residuals of the model, counted with jact.residuals.
EPS_8 = 2 * (1 + 2**-8) / 255
# bits=32 stores residuals as they are; only the order of float32 operations may differ.
FLOAT32_RTOL = 1e-5


def _assert_trees_close(actual, expected, rtol: float) -> None:
  """Leafwise closeness with an absolute tolerance scaled to the whole tree's norm."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  scale = tree_norm(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, e, rtol=0, atol=rtol * scale)


def _batch(seed: int = 0):
  images = jax.random.normal(jax.random.key(seed), (BATCH, SIDE, SIDE, 1))
  labels = jax.random.randint(jax.random.key(seed + 1), (BATCH,), 0, CLASSES)
  return images, labels


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# --- linen ---------------------------------------------------------------------------------------

class ConvBlock(nn.Module):
  features: int = CHANNELS

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dropout(0.25, deterministic=not train)(nn.gelu(x))


def _compression(bits, **options):
  """A decorator compressing at `bits` with every compressible residual eligible; None: none."""
  if bits is None:
    return lambda target: target
  return jact.compress(bits=bits, min_size=1024, **options)


def make_linen_net(bits=None):
  """The test network; `bits=None` builds it without jact, else with every form of compression."""
  class AttentionBlock(nn.Module):
    @_compression(bits, static_argnums=2)  # counts `self`, as nn.remat does
    @nn.compact
    def __call__(self, x, deterministic):
      h = nn.LayerNorm()(x)
      return x + nn.MultiHeadDotProductAttention(num_heads=2, dropout_rate=0.1,
                                                 deterministic=deterministic)(h)

  @_compression(bits)
  class Head(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(CLASSES)(nn.gelu(nn.Dense(32)(x.mean(axis=1))))

  block = ConvBlock if bits is None else jact.compressed(ConvBlock, bits, static_argnums=2, min_size=1024)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, images, train: bool):
      x = block()(images, train)
      x = x.reshape(x.shape[0], -1, x.shape[-1])
      return Head()(AttentionBlock()(x, not train))

  return Net()


def _linen_loss(model):
  def loss(params, batch_stats, images, labels, rng):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, True,
                                  rngs={"dropout": rng}, mutable=["batch_stats"])
    return _cross_entropy(logits, labels), updates["batch_stats"]

  return loss


def _linen_grads(model, variables, batch):
  grad_fn = jax.jit(jax.value_and_grad(_linen_loss(model), has_aux=True))
  (loss, stats), grads = grad_fn(variables["params"], variables["batch_stats"], *batch,
                                 jax.random.key(7))
  return loss, grads, stats


def _linen_init(model, images):
  init = jax.jit(lambda rngs, images: model.init(rngs, images, True))
  return init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, images)


@pytest.fixture(scope="module")
def linen_setup():
  batch = _batch()
  baseline = make_linen_net()
  variables = _linen_init(baseline, batch[0])
  return baseline, variables, batch, _linen_grads(baseline, variables, batch)


def test_linen_variable_tree_is_unchanged(linen_setup):
  _, variables, batch, _ = linen_setup
  compressed = _linen_init(make_linen_net(bits=2), batch[0])
  _assert_trees_close(compressed, variables, 0)  # same paths, so the same initial values


def test_linen_32_bits_matches_uncompressed(linen_setup):
  _, variables, batch, (loss, grads, stats) = linen_setup
  loss32, grads32, stats32 = _linen_grads(make_linen_net(bits=32), variables, batch)
  np.testing.assert_allclose(loss32, loss, rtol=FLOAT32_RTOL)
  _assert_trees_close(grads32, grads, FLOAT32_RTOL)
  _assert_trees_close(stats32, stats, FLOAT32_RTOL)


def test_linen_8_bits_gradients_within_codec_bound(linen_setup):
  _, variables, batch, (loss, grads, stats) = linen_setup
  model = make_linen_net(bits=8)
  loss8, grads8, stats8 = _linen_grads(model, variables, batch)
  np.testing.assert_allclose(loss8, loss, rtol=FLOAT32_RTOL)  # the forward pass is exact
  _assert_trees_close(stats8, stats, FLOAT32_RTOL)
  table = jact.residuals(lambda p: _linen_loss(model)(p, variables["batch_stats"], *batch,
                                                      jax.random.key(7))[0], variables["params"])
  num_compressed = sum(r.compressed for r in table)
  assert num_compressed > 0
  assert relative_error(grads8, grads) <= num_compressed * EPS_8


def test_linen_residual_names_carry_module_paths(linen_setup):
  _, variables, batch, _ = linen_setup
  model = make_linen_net(bits=4)

  def loss(params):
    return _linen_loss(model)(params, variables["batch_stats"], *batch, jax.random.key(7))[0]

  table = jact.residuals(loss, variables["params"])
  names = [r.name for r in table]
  for module in ("ConvBlock_0", "AttentionBlock_0", "Head_0"):
    assert any(n.startswith(f"Net/{module}/") for n in names), (module, names)
  assert "Net/ConvBlock_0/x" in names  # the block's input, named after its argument
  assert any(r.compressed and r.name.startswith("Net/AttentionBlock_0/")
             and "/MultiHeadDotProductAttention_0/" in r.name for r in table)
  assert "Net/ConvBlock_0/x" in str(table)
  assert [r.name for r in jact.residuals(loss, variables["params"])] == [r.name for r in table]


def test_use_policy_overrides_bits_of_built_model(linen_setup):
  _, variables, batch, (_, grads, _) = linen_setup
  model = make_linen_net(bits=32)

  def loss(params):
    return _linen_loss(model)(params, variables["batch_stats"], *batch, jax.random.key(7))[0]

  def compressible_bits(table):
    return {r.name: r.bits for r in table
            if r.name.startswith("Net/") and r.source in ("activation", "input") and not r.kept_because}

  assert set(compressible_bits(jact.residuals(loss, variables["params"])).values()) == {32}
  policy = jact.policies.by_name({"Net/AttentionBlock_0/*": 8, "*": 2})
  with jact.use_policy(policy):
    bits = compressible_bits(jact.residuals(loss, variables["params"]))
  assert bits and all(b == (8 if n.startswith("Net/AttentionBlock_0/") else 2) for n, b in bits.items())
  with jact.use_policy(None):  # no override: each region's own bits
    assert set(compressible_bits(jact.residuals(loss, variables["params"])).values()) == {32}

  @functools.partial(jax.jit, static_argnames="policy")
  def step(params, policy=None):
    with jact.use_policy(policy):
      return jax.grad(loss)(params)

  _assert_trees_close(step(variables["params"]), grads, FLOAT32_RTOL)
  assert relative_error(step(variables["params"], policy), grads) > 0  # retraced with the policy


class Layer(nn.Module):
  @nn.compact
  def __call__(self, x, _=None):
    return nn.tanh(nn.Dense(x.shape[-1])(x)), None


def _scan(layer):
  return nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)


@pytest.mark.parametrize("compose", [
    pytest.param(lambda layer: _scan(layer), id="scan"),
    pytest.param(lambda layer: nn.remat(layer), id="remat_outside"),
    pytest.param(lambda layer: nn.jit(layer), id="jit"),
])
def test_composes_with_linen_transforms(compose):
  x = jax.random.normal(jax.random.key(0), (8, 16))
  baseline = compose(Layer)()
  variables = baseline.init(jax.random.key(1), x)
  loss = lambda model: lambda v: jnp.sum(model.apply(v, x)[0] ** 2)
  expected = jax.grad(loss(baseline))(variables)
  for bits, rtol in ((32, FLOAT32_RTOL), (8, 3 * 2 * EPS_8)):  # 3 layers, 2 compressed residuals each
    model = compose(jact.compressed(Layer, bits, min_size=0))()
    assert jax.tree.structure(model.init(jax.random.key(1), x)) == jax.tree.structure(variables)
    assert relative_error(jax.grad(loss(model))(variables), expected) <= rtol


def test_blocks_under_nn_scan_are_listed_by_their_own_residuals():
  """A compressed model whose pre-LayerNorm blocks run under nn.scan: jact.residuals lists each
  block's residuals over the steps, adding up to what the loop stacks -- the LayerNorm scale's
  broadcast, which the block's rebuilt residuals need, is recomputed from the scale in the
  block's backward pass rather than stored and stacked (the enclosing call recomputed the
  stacked copy, so the bytes did not add up and the table listed the loop's codes instead).
  Gradients are exact at 32 bits."""

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return x + nn.Dense(128)(nn.gelu(nn.Dense(256)(nn.LayerNorm()(x)))), None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=4)
      return scan()(x, None)[0]

  x = jax.random.normal(jax.random.key(0), (4, 32, 128))
  params = Model().init(jax.random.key(1), x)
  loss = lambda model: (lambda p: jnp.sum(model.apply(p, x) ** 2))
  table = jact.residuals(loss(jact.compressed(Model, bits=2)()), params)
  assert not [r for r in table if r.kept_because == "stored by a nested compressed call"], table
  in_loop = [r for r in table if r.loop_steps == (4,)]
  assert any(r.source == "activation" and r.compressed for r in in_loop), table
  assert any(r.recomputed and r.stored_nbytes == 0 for r in in_loop), table  # the scale's broadcast
  exact = jax.grad(loss(Model()))(params)
  assert relative_error(jax.grad(loss(jact.compressed(Model, bits=32)()))(params), exact) < 1e-5


def test_remat_inside_compressed():
  x = jax.random.normal(jax.random.key(0), (8, 16))
  baseline = nn.remat(Layer)()
  variables = baseline.init(jax.random.key(1), x)
  model = jact.compressed(nn.remat(Layer), 32)()
  loss = lambda model: lambda v: jnp.sum(model.apply(v, x)[0] ** 2)
  _assert_trees_close(jax.grad(loss(model))(variables), jax.grad(loss(baseline))(variables),
                      FLOAT32_RTOL)


# --- NNX -----------------------------------------------------------------------------------------

class NnxConvBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, CHANNELS, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(CHANNELS, rngs=rngs)
    self.dropout = nnx.Dropout(0.25, rngs=rngs)

  def __call__(self, x):
    return self.dropout(nnx.gelu(self.norm(self.conv(x))))


def make_nnx_net(bits=None, seed: int = 0):
  """The NNX twin of `make_linen_net`: instance, method and class forms of compression."""
  compress = _compression(bits)

  class Attention(nnx.Module):
    def __init__(self, rngs):
      self.norm = nnx.LayerNorm(CHANNELS, rngs=rngs)
      self.attention = nnx.MultiHeadAttention(2, CHANNELS, dropout_rate=0.1, decode=False,
                                              deterministic=False, rngs=rngs)

    @compress
    def __call__(self, x):
      return x + self.attention(self.norm(x))

  @compress
  class Head(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(CHANNELS, 32, rngs=rngs)
      self.out = nnx.Linear(32, CLASSES, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.gelu(self.hidden(x.mean(axis=1))))

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.block = compress(NnxConvBlock(rngs))
      self.attention = Attention(rngs)
      self.head = Head(rngs)

    def __call__(self, images):
      x = self.block(images)
      return self.head(self.attention(x.reshape(x.shape[0], -1, x.shape[-1])))

  return Net(nnx.Rngs(seed, dropout=seed + 1))


def _nnx_loss(model, images, labels):
  return _cross_entropy(model(images), labels)


@nnx.jit
def _nnx_grads(model, images, labels):
  return nnx.value_and_grad(_nnx_loss)(model, images, labels)


def _nnx_run(bits=None):
  model = make_nnx_net(bits)
  loss, grads = _nnx_grads(model, *_batch())
  return model, loss, grads


@pytest.fixture(scope="module")
def nnx_baseline():
  return _nnx_run()


def test_nnx_state_paths_are_unchanged(nnx_baseline):
  model = make_nnx_net(bits=2)
  baseline = make_nnx_net()
  assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(nnx.state(baseline))
  assert type(model.block).__name__ == "NnxConvBlock"


def test_nnx_32_bits_matches_uncompressed(nnx_baseline):
  base_model, loss, grads = nnx_baseline
  model, loss32, grads32 = _nnx_run(32)
  np.testing.assert_allclose(loss32, loss, rtol=FLOAT32_RTOL)
  _assert_trees_close(grads32, grads, FLOAT32_RTOL)
  _assert_trees_close(nnx.state(model, nnx.BatchStat), nnx.state(base_model, nnx.BatchStat),
                      FLOAT32_RTOL)
  _assert_trees_close(nnx.state(model, nnx.RngCount), nnx.state(base_model, nnx.RngCount), 0)


def test_nnx_8_bits_gradients_within_codec_bound(nnx_baseline):
  base_model, loss, grads = nnx_baseline
  model, loss8, grads8 = _nnx_run(8)
  np.testing.assert_allclose(loss8, loss, rtol=FLOAT32_RTOL)
  _assert_trees_close(nnx.state(model, nnx.BatchStat), nnx.state(base_model, nnx.BatchStat),
                      FLOAT32_RTOL)
  graphdef, state = nnx.split(make_nnx_net(8))
  table = jact.residuals(lambda s: _nnx_loss(nnx.merge(graphdef, s), *_batch()), state)
  num_compressed = sum(r.compressed for r in table)
  assert num_compressed > 0
  assert any(r.name.startswith("NnxConvBlock/") for r in table if r.compressed)
  assert relative_error(grads8, grads) <= num_compressed * EPS_8


def test_nnx_eager_call_updates_state_as_uncompressed():
  images = _batch()[0]
  block, compressed = NnxConvBlock(nnx.Rngs(0)), jact.compress(NnxConvBlock(nnx.Rngs(0)), bits=8)
  np.testing.assert_allclose(compressed(images), block(images), rtol=FLOAT32_RTOL, atol=FLOAT32_RTOL)
  _assert_trees_close(nnx.state(compressed, nnx.BatchStat), nnx.state(block, nnx.BatchStat),
                      FLOAT32_RTOL)
  assert int(compressed.dropout.rngs.count.value) == int(block.dropout.rngs.count.value) == 1


def test_nnx_instance_is_compressed_in_place():
  block = NnxConvBlock(nnx.Rngs(0))
  assert jact.compress(block, bits=4) is block
  assert type(block).__name__ == "NnxConvBlock" and isinstance(block, NnxConvBlock)


# --- training on digits -------------------------------------------------------------------------

STEPS, TRAIN_BATCH, HIDDEN = 300, 64, 256


def _digits():
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(x))
  x, y = x[order], y[order]
  split = len(x) * 4 // 5
  return (x[:split], y[:split]), (x[split:], y[split:])


def _batches(train):
  x, y = train
  rng = np.random.default_rng(1)
  for _ in range(STEPS):
    idx = rng.choice(len(x), TRAIN_BATCH, replace=False)
    yield x[idx], y[idx]


class DenseRelu(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Dense(self.features)(x))


def _linen_mlp(bits):
  layer = DenseRelu if bits is None else jact.compressed(DenseRelu, bits)

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(CLASSES)(layer(HIDDEN)(layer(HIDDEN)(x)))

  return MLP()


def _train_linen(bits, params, train, test) -> float:
  model, tx = _linen_mlp(bits), optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, x, y):
    grads = jax.grad(lambda p: _cross_entropy(model.apply({"params": p}, x), y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for x, y in _batches(train):
    params, opt_state = step(params, opt_state, x, y)
  return float(jnp.mean(jnp.argmax(model.apply({"params": params}, test[0]), -1) == test[1]))


class NnxMLP(nnx.Module):
  def __init__(self, bits, rngs):
    layer = lambda n_in: nnx.Sequential(nnx.Linear(n_in, HIDDEN, rngs=rngs), nnx.relu)
    maybe = (lambda m: m) if bits is None else jact.compress(bits=bits)
    self.hidden = nnx.List([maybe(layer(64)), maybe(layer(HIDDEN))])
    self.out = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

  def __call__(self, x):
    for layer in self.hidden:
      x = layer(x)
    return self.out(x)


def _train_nnx(bits, train, test) -> float:
  model = NnxMLP(bits, nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    grads = nnx.grad(lambda m: _cross_entropy(m(x), y))(model)
    optimizer.update(model, grads)

  for x, y in _batches(train):
    step(model, optimizer, x, y)
  return float(jnp.mean(jnp.argmax(model(test[0]), -1) == test[1]))


def test_digits_training_at_4_bits_matches_uncompressed_accuracy():
  train, test = _digits()
  params = _linen_mlp(None).init(jax.random.key(0), train[0][:1])["params"]
  linen_baseline = _train_linen(None, params, train, test)
  linen_4 = _train_linen(4, params, train, test)
  nnx_baseline, nnx_4 = _train_nnx(None, train, test), _train_nnx(4, train, test)
  assert linen_baseline > 0.9 and nnx_baseline > 0.9
  assert abs(linen_4 - linen_baseline) <= 0.01
  assert abs(nnx_4 - nnx_baseline) <= 0.01


# --- functions and errors -----------------------------------------------------------------------

def test_compress_function_is_remat_compress():
  x = jax.random.normal(jax.random.key(0), (16, 64))
  w = jax.random.normal(jax.random.key(1), (64, 64))
  f = lambda x, w: jnp.sum(jnp.tanh(x @ w) ** 2)
  compressed = jact.compress(f, bits=8, min_size=0)
  reference = jact.remat_compress(f, bits=8, min_size=0)
  for actual, expected in zip(jax.grad(compressed, argnums=(0, 1))(x, w),
                              jax.grad(reference, argnums=(0, 1))(x, w)):
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("target", [42, "Block", nn.Dense(3), jnp.ones(3)])
def test_compress_rejects_what_it_cannot_compress(target):
  with pytest.raises(TypeError, match="jact.compress"):
    jact.compress(target, bits=2)


def test_compressed_rejects_non_linen_targets():
  with pytest.raises(TypeError, match="instance"):
    jact.compressed(nn.Dense(3), bits=2)
  with pytest.raises(TypeError, match="linen Module class"):
    jact.compressed(NnxConvBlock, bits=2)


def test_unsupported_policy_bits_surface_with_residual_name(linen_setup):
  _, variables, batch, _ = linen_setup
  model = make_linen_net(bits=lambda info: 3)
  with pytest.raises(ValueError, match=r"bits=3.*Net/ConvBlock_0/"):
    jax.grad(lambda p: _linen_loss(model)(p, variables["batch_stats"], *batch, jax.random.key(7))[0])(
        variables["params"])
  with pytest.raises(ValueError, match="bits=3"):
    jact.compress(nn.Dense, bits=3)


def test_static_argnums_naming_the_module_is_an_error():
  x = jnp.ones((2, 4))
  model = jact.compressed(Layer, 8, static_argnums=0)()
  with pytest.raises(ValueError, match="static_argnums"):
    model.init(jax.random.key(0), x)


class TrainBlock(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.BatchNorm(use_running_average=not train)(nn.Dense(64)(x))
    return nn.gelu(x) if train else -nn.gelu(x)


@pytest.mark.parametrize("as_keyword", [False, True])
def test_python_bool_argument_needs_no_static_argnums(as_keyword):
  """`train: bool` is static without static_argnums (nn.remat would need it): both values run,
  and gradients and batch statistics are exact at 32 bits."""
  x = jax.random.normal(jax.random.key(0), (32, 16))
  plain, compressed = TrainBlock(), jact.compressed(TrainBlock, bits=32)()
  variables = plain.init(jax.random.key(1), x, False)
  call = lambda model, train: (lambda v: model.apply(v, x, train=train, mutable=["batch_stats"])) if as_keyword \
      else (lambda v: model.apply(v, x, train, mutable=["batch_stats"]))
  for train in (True, False):
    out, state = call(compressed, train)(variables)
    want, want_state = call(plain, train)(variables)
    assert relative_error(out, want) < 1e-6 and relative_error(state, want_state) < 1e-6
  loss = lambda model: lambda params: jnp.sum(call(model, True)({**variables, "params": params})[0] ** 2)
  assert relative_error(jax.grad(loss(compressed))(variables["params"]),
                        jax.grad(loss(plain))(variables["params"])) < 1e-5
