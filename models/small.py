"""Small functional models with compressed layers, and the measurements `jact.calibrate` is checked against.

Each model constructor returns `(loss, params, x)`: `loss(bits)` builds `f(params, x, rng=None)`,
a scalar loss whose compressed calls store their residuals at `bits` (an int or a policy), with
rounding noise selected by `rng` (a `jax.random` key). Shared by tests/test_calibrate.py,
tests/test_recalibration.py and benchmarks/calibrate.py.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import jact
from jact import sensitivity

Model = tuple[Callable[[Any], Callable], Any, jax.Array]
"""`(loss, params, x)`: `loss(bits)(params, x, rng=None)` is the scalar loss."""


def _rng(rng: jax.Array | None, index: int) -> jax.Array | None:
  return None if rng is None else jax.random.fold_in(rng, index)


def mlp(scales: Sequence[float] = (1.0, 1.0, 1.0), width: int = 96, batch: int = 128) -> Model:
  """GELU layers `x @ w_i`, each compressed; `scales` multiplies each layer's weights (and so
  how much its residuals matter)."""
  key = jax.random.key(0)
  params = [jax.random.normal(jax.random.fold_in(key, i), (width, width)) / width**0.5 * s
            for i, s in enumerate(scales)]
  x = jax.random.normal(jax.random.key(1), (batch, width))

  def loss(bits):
    layers = [jact.remat_compress(lambda h, w: jax.nn.gelu(h @ w), bits=bits, keep_argnums=(1,), min_size=0,
                                  name=f"dense{i}") for i in range(len(params))]

    def f(params, x, rng=None):
      for i, (layer, w) in enumerate(zip(layers, params)):
        x = layer(x, w, rng=_rng(rng, i))
      return jnp.mean(jnp.sin(x))
    return f
  return loss, params, x


def cnn_batchnorm() -> Model:
  """Conv -> BatchNorm (batch statistics) -> ReLU blocks, each compressed, then a linear head."""
  key = jax.random.key(2)
  params = {"conv": [jax.random.normal(jax.random.fold_in(key, i), (3, 3, 8, 8)) / 8 for i in range(2)],
            "scale": [jnp.ones(8), jnp.ones(8)], "head": jax.random.normal(key, (8, 4)) / 3}
  x = jax.random.normal(jax.random.key(3), (16, 12, 12, 8))

  def block(x, kernel, scale):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    mean, var = jnp.mean(y, (0, 1, 2)), jnp.var(y, (0, 1, 2))
    return jax.nn.relu((y - mean) * jax.lax.rsqrt(var + 1e-5) * scale)

  def loss(bits):
    blocks = [jact.remat_compress(block, bits=bits, keep_argnums=(1, 2), min_size=0, name=f"block{i}")
              for i in range(2)]

    def f(params, x, rng=None):
      for i, b in enumerate(blocks):
        x = b(x, params["conv"][i], params["scale"][i], rng=_rng(rng, i))
      return jnp.mean(jnp.mean(x, (1, 2)) @ params["head"])
    return f
  return loss, params, x


def transformer_block() -> Model:
  """One pre-LayerNorm transformer block (4-head attention, GELU MLP), compressed as a whole."""
  key = jax.random.key(4)
  d, heads = 64, 4
  names = ("wq", "wk", "wv", "wo", "w1", "w2")
  shapes = ((d, d),) * 4 + ((d, 4 * d), (4 * d, d))
  params = {n: jax.random.normal(jax.random.fold_in(key, i), s) / s[0] ** 0.5
            for i, (n, s) in enumerate(zip(names, shapes))}
  x = jax.random.normal(jax.random.key(5), (8, 32, d))

  def norm(h):
    return (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + 1e-5)

  def block(x, p):
    h = norm(x)
    split = lambda t: t.reshape(*t.shape[:-1], heads, d // heads)
    q, k, v = split(h @ p["wq"]), split(h @ p["wk"]), split(h @ p["wv"])
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / (d // heads) ** 0.5, axis=-1)
    x = x + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(x.shape) @ p["wo"]
    return x + jax.nn.gelu(norm(x) @ p["w1"]) @ p["w2"]

  def loss(bits):
    b = jact.remat_compress(block, bits=bits, keep_argnums=(1,), min_size=0, name="block")
    return lambda params, x, rng=None: jnp.mean(jnp.tanh(b(x, params, rng=rng)))
  return loss, params, x


def residual_stack(gains: Sequence[float] = (1.0,) * 6, width: int = 96, batch: int = 128) -> Model:
  """`x + gain_i * gelu(x @ w_i)` for each `w_i`, through ONE compressed `layer` called once per
  layer (the README's first example): no names or scopes tell the calls apart, so per-layer
  calibration rests on jact numbering repeated calls. A layer's residuals matter in proportion
  to its `gain` (the gradient reaching it), so their sensitivities scale like `gain**2`."""
  key = jax.random.key(6)
  params = [jax.random.normal(jax.random.fold_in(key, i), (width, width)) / width**0.5
            for i in range(len(gains))]
  x = jax.random.normal(jax.random.key(7), (batch, width))

  def loss(bits):
    def layer(h, w):
      return jax.nn.gelu(h @ w)
    layer = jact.remat_compress(layer, bits=bits, keep_argnums=(1,), min_size=0)

    def f(params, x, rng=None):
      for i, w in enumerate(params):
        x = x + gains[i] * layer(x, w, rng=_rng(rng, i))
      return jnp.mean(jnp.sin(x))
    return f
  return loss, params, x


MODELS: dict[str, Callable[[], Model]] = {"mlp": mlp, "cnn_batchnorm": cnn_batchnorm,
                                          "transformer": transformer_block}


def squared_errors(gradient: Callable[[jax.Array], Any], exact: Any, num_seeds: int = 64,
                   progress: bool = False) -> np.ndarray:
  """||gradient(key) - exact||^2 for `num_seeds` rounding keys: samples whose mean is the measured
  gradient variance.

  Args:
    gradient: the compressed gradient, with its rounding noise selected by a `jax.random` key.
    exact: the gradient without compression.
    num_seeds: keys 0, 1, ... drawn.
    progress: show a progress bar.
  """
  distance = jax.jit(lambda g, exact: sensitivity._squared_norm(jax.tree.map(jnp.subtract, g, exact)))
  seeds = tqdm(range(num_seeds), desc="measured variance", disable=not progress or None, leave=False)
  return np.array([float(distance(gradient(jax.random.key(s)), exact)) for s in seeds])


def compressed_squared_errors(loss: Callable[[Any], Callable], params: Any, x: jax.Array, bits: Any,
                              num_seeds: int = 64) -> np.ndarray:
  """`squared_errors` of a model of this module at `bits` (an int or a policy), on the real
  compressed path, against its gradient at 32 bits."""
  gradient = jax.jit(lambda params, x, rng: jax.grad(loss(bits))(params, x, rng=rng))
  return squared_errors(lambda rng: gradient(params, x, rng), jax.grad(loss(32))(params, x), num_seeds)


def residual_squared_errors(loss_fn: Callable, args: Sequence[Any], names: Sequence[str], bits: Sequence[int],
                            num_seeds: int = 64, has_aux: bool = False) -> dict[tuple[str, int], np.ndarray]:
  """`squared_errors` with one residual name quantised and every other residual exact.

  The gradient of `loss_fn` (returning `(loss, aux)` with `has_aux`) with respect to `args[0]`
  is taken with the residuals named `name` replaced by their decoded values at each width in
  `bits` (the codec's stochastic rounding), against the exact gradient.

  Returns:
    `{(name, bits): squared errors}`.
  """
  probed = sensitivity._Probed(loss_fn, {}, 0, has_aux)
  values, infos = probed.residuals(args)
  gradient = jax.jit(lambda deltas, args: probed.gradient(deltas, *args)[0])
  exact = gradient({}, list(args))
  out = {}
  for name in names:
    keys = [k for k in values if k[0] == name]
    for b in bits:
      def noisy(rng):
        seeds = jax.random.bits(rng, (len(keys),), jnp.uint32)
        return gradient({k: sensitivity._rounding_error(values[k], s, b, infos[name].group_size)
                         for k, s in zip(keys, seeds)}, list(args))
      out[name, b] = squared_errors(noisy, exact, num_seeds)
  return out
