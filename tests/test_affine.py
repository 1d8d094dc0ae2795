"""Residuals that are affine functions of one another are stored once (jact.rewrites.affine)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jact
from jact import _jaxpr
from jact.rewrites import affine as _affine
from tree_math import relative_error

CHANNELS = 256


class NormBlock(nn.Module):
  """BatchNorm, a nonlinearity and LayerNorm with a learned scale: Flax's fast variance saves
  `2 * x` and `x - mean` for each, and LayerNorm also `rsqrt(var) * scale`."""

  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=False)(x)
    return nn.LayerNorm(scale_init=nn.initializers.normal(1.0))(jnp.tanh(x))


def block_data():
  # Channels with different means and scales, so that centring matters.
  x = (jax.random.normal(jax.random.key(1), (32, 4, 4, CHANNELS)) * jnp.linspace(0.1, 5, CHANNELS)
       + jnp.linspace(-3, 3, CHANNELS))
  variables = NormBlock().init(jax.random.key(0), x)
  return variables, x


def block_fn(variables):
  def apply(params, x):
    y, _ = NormBlock().apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                             mutable=["batch_stats"])
    return y
  return apply


def block_loss(f):
  weights = jnp.sin(jnp.arange(CHANNELS, dtype=jnp.float32))
  return lambda params, x, **kw: jnp.sum(f(params, x, **kw) * weights)


def test_normalisation_layers_store_one_full_size_residual_each():
  variables, x = block_data()
  table = jact.residuals(jact.remat_compress(block_fn(variables), bits=2), variables["params"], x)
  by_name = {info.name.split("/", 1)[1]: info for info in table}
  full = [info for info in table if info.size == x.size]
  stored = [info for info in full if not info.rebuilt_from]
  # BatchNorm: x - mean; tanh: its derivative; LayerNorm: x - mean.
  assert sorted(info.name.split("/", 1)[1] for info in stored) == [
      "NormBlock/BatchNorm_0/sub0", "NormBlock/LayerNorm_0/sub0", "NormBlock/one_minus_square0"]
  assert by_name["NormBlock/BatchNorm_0/mul0"].rebuilt_from.endswith("BatchNorm_0/sub0")
  assert by_name["NormBlock/LayerNorm_0/mul0"].rebuilt_from.endswith("LayerNorm_0/sub0")
  assert by_name["NormBlock/LayerNorm_0/mul3"].rebuilt_from == "small values"
  for info in full:
    if info.rebuilt_from:  # only the small values the rebuild reads: a mean, a scale, 1/sigma
      assert 0 < info.stored_nbytes <= 2 * x.size // x.shape[-1] * 4 + 2 * CHANNELS * 4
  packed = x.size * 2 // 8 + x.size // 256 * 4
  assert sum(info.stored_nbytes for info in stored) == 3 * packed


def test_rebuilt_residuals_keep_the_gradient_unbiased():
  """Rebuilt residuals are affine in the representative's decoded value, so the gradient stays
  an unbiased estimate: the mean of K draws approaches the exact gradient like 1/sqrt(K)."""
  variables, x = block_data()
  f = block_fn(variables)
  exact = jax.grad(block_loss(f))(variables["params"], x)
  compressed = jact.remat_compress(f, bits=2)
  grad = jax.jit(lambda p, x, rng: jax.grad(block_loss(compressed))(p, x, rng=rng))
  draws = [grad(variables["params"], x, jax.random.key(s)) for s in range(64)]
  single = np.sqrt(np.mean([relative_error(g, exact) ** 2 for g in draws]))
  assert single < 0.5
  for k in (4, 64):
    mean = jax.tree.map(lambda *g: sum(g) / k, *draws[:k])
    # Independent draws average down by sqrt(K); 30% for the estimate of the single error.
    assert relative_error(mean, exact) < 1.3 * single / np.sqrt(k), (k, relative_error(mean, exact), single)


def test_8_bits_gradient_is_close():
  """At 8 bits the codec step is 3/255 of the 2-bit step: a gradient error of about 0.1-0.5%."""
  variables, x = block_data()
  f = block_fn(variables)
  exact = jax.grad(block_loss(f))(variables["params"], x)
  got = jax.jit(jax.grad(block_loss(jact.remat_compress(f, bits=8))))(variables["params"], x)
  assert relative_error(got, exact) < 0.01


def rebuilt_members(fun, *args):
  """Rebuilds every residual of `fun` that jact.rewrites.affine groups from the exact value of its
  representative, as the backward pass does from the decoded value; returns (rebuilt, forward)."""
  def forward(*xs):
    outs, vjp_fn = jax.vjp(fun, *xs)
    return outs, jax.tree.leaves(vjp_fn)
  closed = jax.make_jaxpr(forward)(*args)
  jaxpr = closed.jaxpr
  values = _jaxpr.bind_inputs(jaxpr, closed.consts, args)
  for eqn in jaxpr.eqns:
    for var, value in zip(eqn.outvars, _jaxpr.eval_eqn(eqn, [values.read(v) for v in eqn.invars])):
      values.write(var, value)
  residuals = [v for v in jaxpr.outvars[1:] if not _jaxpr.is_literal(v) and v.aval.size == args[0].size]
  groups = _affine.representatives(jaxpr, dict(enumerate(residuals)))
  out = []
  for uid, (rep, paths) in groups.items():
    if uid == rep:
      continue
    representative = None if rep is None else paths[rep]
    needed = _affine.small_operands(jaxpr, [p for p in (representative, paths[uid]) if p])
    smalls = {v: values.read(v) for v in needed}
    start = None if rep is None else values.read(residuals[rep])
    out.append((_affine.rebuild(jaxpr, representative, paths[uid], start, smalls), values.read(residuals[uid])))
  return out


SCALES = jnp.linspace(0.5, 2.0, CHANNELS)


@pytest.mark.parametrize("relation", [
    lambda x, m: (2.0 * x, x - m),           # undo a subtraction, then scale by a literal
    lambda x, m: (x, m - x),                 # subtraction from a small value
    lambda x, m: (x / 4.0, -(x + m)),        # negation and addition; division by a literal
    lambda x, m: (3.0 * x, (x - m) / 4.0),   # undo a division by a literal
    lambda x, m: (x * SCALES.astype(x.dtype), x - m),  # a per-channel factor: rebuilt forward, not undone
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rebuild_inverts_the_representatives_path(relation, dtype):
  """From the representative's exact value the rebuilt members equal the forward pass's values
  up to rounding (the paths are exact in real arithmetic): the root is rebuilt in float32 and
  rounded once to its dtype, within an ulp of the forward's, then scaled by at most 3."""
  x = (jax.random.normal(jax.random.key(0), (64, CHANNELS)) + jnp.arange(CHANNELS) / 10).astype(dtype)

  def fun(x):
    a, b = relation(x, jnp.mean(x, axis=0, keepdims=True))
    return jnp.sum(a * b)  # saves both a and b

  pairs = rebuilt_members(fun, x)
  assert len(pairs) == 1
  (rebuilt, forward), = pairs
  assert rebuilt.shape == forward.shape and rebuilt.dtype == forward.dtype
  bound = 3 * 4 * float(jnp.finfo(dtype).eps) * float(jnp.max(jnp.abs(x)))
  np.testing.assert_allclose(np.asarray(rebuilt, np.float32), np.asarray(forward, np.float32), rtol=0, atol=bound)


def test_non_affine_relatives_are_stored_separately():
  """`c / x` and products of two full-size values are not affine: each residual is stored."""
  x = jax.random.normal(jax.random.key(0), (64, CHANNELS)) + 4.0
  w = jax.random.normal(jax.random.key(1), (64, CHANNELS))

  def fun(x, w):
    return jnp.sum(jnp.sin(1.0 / x) * jnp.cos(x * w) + jnp.sin(x) ** 2)

  table = jact.residuals(jact.remat_compress(fun, bits=2, keep_argnums=(1,)), x, w)
  assert not any(info.rebuilt_from for info in table)


def test_calibrate_prices_rebuilt_residuals_at_nothing():
  """`jact.calibrate` chooses one width for a stored residual and those rebuilt from it (their
  variances summed, the stored one's bytes), so the stored bytes stay within the budget."""
  variables, x = block_data()
  f = block_fn(variables)
  compressed = jact.remat_compress(f, bits=2)
  policy = jact.calibrate(block_loss(compressed), variables["params"], x, avg_bits=3,
                          candidates=(2, 4, 8), progress=False)
  rows = {r.name: r for r in policy.residuals}
  rebuilt = [r for r in policy.residuals if r.rebuilt_from]
  assert len(rebuilt) >= 3
  for r in rebuilt:
    assert r.stored_nbytes_at(r.bits) == 0
    assert r.bits == (rows[r.rebuilt_from].bits if r.rebuilt_from in rows else min(policy.candidates))
  stored = jact.residuals(jact.remat_compress(f, bits=policy), variables["params"], x)
  assert stored.activation_nbytes(stored=True) <= policy.budget_bytes + sum(info.extra_nbytes for info in stored)
  assert policy.stored_nbytes <= policy.budget_bytes
  assert jact.policies.from_json(jact.policies.to_json(policy)) == policy
