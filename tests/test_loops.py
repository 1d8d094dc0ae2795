"""Loops inside a compressed function are compressed step by step (jact._loops)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jact
from small_mlp import mlp_data, rel_err, compressed


def _rnn(cell, callback=False):
  def run(xs, w):
    def step(h, x):
      h = cell(h, x, w)
      if callback:  # an effect: the loop is left as it is
        jax.debug.callback(lambda h: None, h)
      return h, h
    h, hs = jax.lax.scan(step, jnp.zeros(xs.shape[1:]), xs)
    return jnp.sum(hs ** 2)
  return run


def _cell(h, x, w):
  return jnp.tanh(h @ w + x)


def _rnn_temp_and_stack(steps: int, batch: int, width: int):
  """Compiled temp bytes of an RNN gradient step (a function of the wrapped RNN, abstract inputs),
  and the bytes of one residual stacked over the steps at full precision."""
  xs = jax.ShapeDtypeStruct((steps, batch, width), jnp.float32)
  w = jax.ShapeDtypeStruct((width, width), jnp.float32)
  return (lambda f: jact.memory.compiled(jax.grad(f, argnums=(0, 1)), xs, w).temp), steps * batch * width * 4


def _count(jaxpr, primitive: str) -> int:
  """Equations of `primitive` in a jaxpr and every jaxpr nested in it."""
  from jax.extend import core
  return sum((eqn.primitive.name == primitive)
             + sum(_count(sub, primitive) for sub in core.jaxprs_in_params(eqn.params)) for eqn in jaxpr.eqns)


def test_a_scans_carry_is_followed_through_every_step():
  """What a scan carries holds, from the second step on, what earlier steps computed, not only its
  initial value: an RNN's stacked states (the carry before each update, starting from zeros)
  depend on the inputs; a carry that counts has no small value set and one that flips between 0
  and 1 takes two values; a carry that becomes a residual and then divides is nonlinear in it."""
  from jact import _jaxpr

  def rnn(xs, w):
    def step(h, x):
      return jnp.tanh(h @ w + x), h  # the state before the update
    return jax.lax.scan(step, jnp.zeros(xs.shape[1:]), xs)[1]

  traced = jax.make_jaxpr(rnn)(jnp.ones((16, 64, 128)), jnp.ones((128, 128)))
  deps = _jaxpr.dependence(traced.jaxpr, [frozenset({"xs"}), frozenset({"w"})])
  assert deps[traced.jaxpr.outvars[0]] == frozenset({"xs", "w"})

  steps = jnp.zeros(8)
  counting = jax.make_jaxpr(lambda s: jax.lax.scan(lambda c, _: (c + 1.0, c), 0.0, s))(steps)
  flipping = jax.make_jaxpr(lambda s: jax.lax.scan(lambda c, _: (1.0 - c, c), 0.0, s))(steps)
  assert _jaxpr.value_sets(counting.jaxpr).get(counting.jaxpr.outvars[1]) is None
  assert _jaxpr.value_sets(flipping.jaxpr).get(flipping.jaxpr.outvars[1]) == frozenset({0.0, 1.0})
  divided = jax.make_jaxpr(lambda rs: jax.lax.scan(lambda c, r: (r, 1.0 / c), 1.0, rs))(jnp.ones(4))
  assert _jaxpr.degrees(divided.jaxpr, [1])[1] == _jaxpr.NONLINEAR


def test_a_loop_in_a_compressed_function_is_compressed_step_by_step():
  """A lax.scan inside a compressed function (an RNN, layers under nn.scan) runs with its body
  compressed on its own: each step quantises its residuals, so the loop stacks codes, not
  full-precision values. The compiled step needs about what compressing the body by hand needs,
  and at least a stack less than uncompressed. Gradients: exact at 32 bits, within 8-bit
  rounding at 8."""
  import warnings

  temp, stack = _rnn_temp_and_stack(steps=64, batch=256, width=256)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    outside = temp(jact.remat_compress(_rnn(_cell), bits=2, keep_argnums=(1,)))
    inside = temp(_rnn(jact.remat_compress(_cell, bits=2, keep_argnums=(2,))))
  assert outside <= min(inside + stack / 4, temp(_rnn(_cell)) - stack), (outside / stack, inside / stack)

  xs = jax.random.normal(jax.random.key(0), (16, 64, 128))
  w = 0.1 * jax.random.normal(jax.random.key(1), (128, 128))
  grad = lambda f: jax.grad(f, argnums=(0, 1))(xs, w)
  exact = grad(_rnn(_cell))
  assert rel_err(grad(jact.remat_compress(_rnn(_cell), bits=32, keep_argnums=(1,))), exact) < 1e-5
  assert rel_err(grad(jact.remat_compress(_rnn(_cell), bits=8, keep_argnums=(1,))), exact) < 0.03
  table = jact.residuals(jact.remat_compress(_rnn(_cell), bits=2, keep_argnums=(1,)), xs, w)
  assert not [r for r in table if r.shape == xs.shape and r.stored_nbytes == r.nbytes], table
  # The table lists the body's residuals over the steps (its state and tanh's derivative), not the
  # codes the loop stacks; their bytes add up to those codes' (else the codes would be listed).
  in_loop = [r for r in table if r.loop_steps]
  assert [(r.shape, r.bits, r.loop_steps) for r in in_loop] == [(xs.shape, 2, (16,))] * 2, table
  assert not [r for r in table if r.kept_because == "stored by a nested compressed call"], table


def test_a_loop_of_small_steps_is_compressed_step_by_step():
  """min_size applies to what a loop keeps of a residual, all its steps: an RNN whose per-step
  residuals (16 x 128 = 2048 values) are below the default min_size of 4096, but which keeps them
  over 512 steps, is compressed step by step and needs two stacks less than uncompressed
  (measured: 1.20 against 4.00 stacks; with min_size per step, 3.07 and a warning)."""
  import warnings

  temp, stack = _rnn_temp_and_stack(steps=512, batch=16, width=128)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    outside = temp(jact.remat_compress(_rnn(_cell), bits=2, keep_argnums=(1,)))
  assert outside <= temp(_rnn(_cell)) - 2 * stack, (outside / stack, temp(_rnn(_cell)) / stack)


def test_a_loop_compressed_step_by_step_is_unbiased_over_rngs():
  """The `rng` of the call reaches the loop's body: the mean of K gradients over different rngs
  approaches the exact one like 1/sqrt(K), as for a function without a loop. (With each step's
  seed from the step number alone, the body's rounding was the same for every rng and the mean
  of 64 gradients stayed 5x further from the exact one than this bound.)"""
  import warnings

  xs = jax.random.normal(jax.random.key(0), (16, 64, 128))
  w = 0.1 * jax.random.normal(jax.random.key(1), (128, 128))
  f = jact.remat_compress(_rnn(_cell), bits=2, keep_argnums=(1,))
  grad = jax.jit(lambda xs, w, rng: jax.grad(lambda xs, w: f(xs, w, rng=rng), argnums=(0, 1))(xs, w))
  exact = jax.grad(_rnn(_cell), argnums=(0, 1))(xs, w)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the loop is rewritten, not left stacked
    gs = [grad(xs, w, jax.random.key(s)) for s in range(64)]
  err1 = float(np.sqrt(np.mean([rel_err(g, exact) ** 2 for g in gs])))
  for k in (4, 64):
    mean = jax.tree.map(lambda *g: sum(g) / k, *gs[:k])
    assert rel_err(mean, exact) < 1.3 * err1 / np.sqrt(k), (k, rel_err(mean, exact), err1)


def test_calibrate_sizes_a_loop_body_residual_by_residual():
  """While jact.calibrate probes, a loop runs with its body's residuals stored as they are and
  named as the body names them, stacked over the steps: it measures each one's effect on the
  gradient, and its policy gives each its own width in the body, which the loop then runs
  compressed step by step. (Before, calibrate named the stacked residuals after the loop, the
  policy gave the body's residuals no width, and the loop stacked them at full precision.)"""
  import warnings

  xs = jax.random.normal(jax.random.key(0), (8, 256, 256))
  w = 0.05 * jax.random.normal(jax.random.key(1), (256, 256))
  f = lambda bits: jact.remat_compress(_rnn(_cell), bits=bits, keep_argnums=(1,))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    policy = jact.calibrate(lambda w, xs: f(2)(xs, w), w, xs, avg_bits=3, progress=False)
    table = jact.residuals(f(policy), xs, w)
  in_body = {r.name: r for r in policy.residuals if r.name.startswith("run/loop0/")}
  # the RNN's states and tanh's derivative, as the body names them, each over the 8 steps
  assert len(in_body) == 2 and all(r.shapes == ((8, 256, 256),) for r in in_body.values()), policy
  assert not [r for r in table if r.stacked_by_loop and r.compressed], table
  in_loop = {r.name: r for r in table if r.loop_steps}
  assert {n: r.bits for n, r in in_loop.items()} == {n: r.bits for n, r in in_body.items()}, (table, policy)


def test_nested_loops_are_compressed_listed_and_calibrated_level_by_level():
  """A scan inside a scan's body: the inner loop runs compressed step by step inside the outer
  one's compressed body. jact.residuals lists the inner body's residuals over both loops' steps
  (4 x 4), adding up to the codes the loops stack; calibrate names them through both bodies.
  Gradients: exact at 32 bits, within 8-bit rounding at 8."""
  import warnings

  def run(xs, w):
    def outer_step(h, rows):
      def inner_step(g, x):
        g = jnp.tanh(g @ w + x)
        return g, g
      h, gs = jax.lax.scan(inner_step, h, rows)
      return h, jnp.sum(gs ** 2)
    _, sums = jax.lax.scan(outer_step, jnp.zeros(xs.shape[2:]), xs)
    return jnp.sum(sums)

  xs = jax.random.normal(jax.random.key(0), (4, 4, 128, 128))
  w = 0.05 * jax.random.normal(jax.random.key(1), (128, 128))
  f = lambda bits: jact.remat_compress(run, bits=bits, keep_argnums=(1,))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    table = jact.residuals(f(2), xs, w)
    policy = jact.calibrate(lambda w, xs: f(2)(xs, w), w, xs, avg_bits=2, progress=False)
  assert sorted(r.loop_steps for r in table if r.loop_steps) == [(4,), (4, 4), (4, 4)], table
  assert not [r for r in table if r.kept_because == "stored by a nested compressed call"], table
  assert all(r.shape == xs.shape and r.bits == 2 for r in table if r.loop_steps == (4, 4)), table
  assert len([r for r in policy.residuals if r.name.startswith("run/loop0/loop0/")]) == 2, policy
  exact = jax.grad(run, argnums=1)(xs, w)
  for bits, bound in ((32, 1e-5), (8, 0.02)):
    assert rel_err(jax.grad(f(bits), argnums=1)(xs, w), exact) < bound, bits


def test_a_policy_naming_a_loops_stacked_residuals_gives_its_body_their_finest_width():
  """A policy that names residuals as the loop stacks them (`<scope>/scan<k>`, as a policy from
  an older jact.calibrate does) gives the body's own residuals no width; the body gets the finest
  width the policy gives the stacked ones, and the loop still stacks codes."""
  import warnings

  xs, w = jnp.ones((8, 256, 256)), jnp.ones((256, 256))
  policy = jact.policies.by_name({"run/scan0": 2, "run/scan1": 4, "run/mul*": 2})
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    table = jact.residuals(jact.remat_compress(_rnn(_cell), bits=policy, keep_argnums=(1,)), xs, w)
  assert not [r for r in table if r.stacked_by_loop and r.compressed], table
  assert [r.bits for r in table if r.loop_steps] == [4, 4], table


def test_a_loop_with_effects_is_left_as_it_is_and_jact_says_so():
  """A loop whose body has effects (a callback) is not rewritten; its residuals are stacked by the
  loop at full precision before jact sees them, and jact warns, naming them."""
  xs, w = jnp.ones((8, 16, 64)), jnp.ones((64, 64))
  g = jact.remat_compress(_rnn(_cell, callback=True), bits=2, keep_argnums=(1,))
  with pytest.warns(UserWarning, match="stacked over the steps of a lax.scan"):
    table = jact.residuals(g, xs, w)
  assert any(r.stacked_by_loop and r.compressed for r in table), table


def test_values_a_loop_computes_from_parameters_alone_are_rebuilt_without_the_loop_over_activations():
  """A scan output that depends on parameters alone is rebuilt in the backward pass by a loop that
  computes only it: the loop's work on activations (a matrix product per step) is not redone, and
  nothing of it is stored for the rebuild. Gradients are exact at 32 bits."""
  ws, x = mlp_data()

  def f(x, w):
    def body(h, _):
      return jnp.tanh(h @ w), jnp.sum(w * w)  # the second output reads the parameter alone
    h, norms = jax.lax.scan(body, x, None, length=3)
    return h * jnp.sum(norms)

  g = jact.remat_compress(f, bits=32, keep_argnums=(1,))
  table = jact.residuals(lambda x, w: jnp.sum(g(x, w)), x, ws[0])
  assert [r.name for r in table if r.recomputed] == ["f/reduce_sum0"], table
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) ** 2)
  products = lambda f: _count(jax.make_jaxpr(jax.grad(loss(f), argnums=(0, 1)))(x, ws[0]).jaxpr, "dot_general")
  assert products(g) == products(f)
  for a, b in zip(jax.grad(loss(g), argnums=(0, 1))(x, ws[0]), jax.grad(loss(f), argnums=(0, 1))(x, ws[0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))
