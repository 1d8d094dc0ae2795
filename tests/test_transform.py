"""remat_compress: exact at 32 bits, error proportional to the codec step, unbiased, composable."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_bits32_gradients_equal_plain_grad():
  ws, x = mlp_data()
  g = jax.jit(jax.grad(mlp_loss(compressed(32))))(ws, x)
  assert rel_err(g, exact_grads()) < 1e-5  # float32 reassociation only
  kc = jax.random.normal(jax.random.key(1), (3, 3, 8, 8)) / 5
  xc = jax.random.normal(jax.random.key(2), (4, 16, 16, 8))
  conv_loss = lambda k, x, f: jnp.sum(f(x, k) ** 2)
  gc = jax.grad(conv_loss)(kc, xc, jact.remat_compress(conv_layer, bits=32, keep_argnums=(1,)))
  assert rel_err(gc, jax.grad(conv_loss)(kc, xc, conv_layer)) < 1e-5


def stochastic_error(bits, seeds):
  """RMS relative gradient error over seeds, and the mean gradient."""
  ws, x = mlp_data()
  f = compressed(bits)
  grad = jax.jit(lambda ws, x, rng: jax.grad(mlp_loss(f))(ws, x, rng=rng))
  gs = [grad(ws, x, jax.random.key(s)) for s in seeds]
  g0 = exact_grads()
  errs = [rel_err(g, g0) for g in gs]
  return float(np.sqrt(np.mean(np.square(errs)))), gs


def test_error_scales_with_the_codec_step():
  """The backward pass is linear in each residual, so the gradient error is a sum of terms
  proportional to each residual's rounding error, whose size is the codec step
  (hi - lo) / (2**b - 1). Hence err(8 bits) / err(2 bits) = 3 / 255 up to the bfloat16 rounding
  of the group bounds; the RMS over 4 seeds estimates each error within ~35%."""
  err2, _ = stochastic_error(2, range(4))
  err8, _ = stochastic_error(8, range(4))
  predicted = err2 * 3 / 255
  assert 0.5 * predicted < err8 < 1.5 * predicted, (err2, err8, predicted)
  assert err8 < 0.02


def test_bits2_is_unbiased():
  """With independent seeds the mean of K gradients approaches the exact one like 1/sqrt(K)."""
  err1, gs = stochastic_error(2, range(64))
  g0 = exact_grads()
  for k in (4, 64):
    mean = jax.tree.map(lambda *g: sum(g) / k, *gs[:k])
    # Errors of K independent draws average down by sqrt(K); allow 30% for the estimate.
    assert rel_err(mean, g0) < 1.3 * err1 / np.sqrt(k), (k, rel_err(mean, g0), err1)


def test_deterministic_without_rng_and_seeded_with_it():
  ws, x = mlp_data()
  f = compressed(2)
  grad = jax.jit(lambda ws, x, rng=None: jax.grad(mlp_loss(f))(ws, x, rng=rng))
  a, b = grad(ws, x), grad(ws, x)
  assert all(jnp.array_equal(u, v) for u, v in zip(a, b))
  k1, k2 = grad(ws, x, jax.random.key(1)), grad(ws, x, jax.random.key(1))
  assert all(jnp.array_equal(u, v) for u, v in zip(k1, k2))
  k3 = grad(ws, x, jax.random.key(2))
  assert not all(jnp.array_equal(u, v) for u, v in zip(k1, k3))


def test_residual_table_keeps_parameters_small_and_integer_residuals():
  def f(x, w, idx):
    h = x @ w
    small = jnp.sin(jnp.sum(h, axis=0))  # a (WIDTH,) residual: below min_size
    picked = jnp.take_along_axis(h, idx, axis=1)  # saves the integer indices
    return jnp.sum(jnp.tanh(h) * small) + jnp.sum(picked * picked)

  ws, x = mlp_data()
  idx = jnp.zeros((BATCH, 1), jnp.int32)
  g = jact.remat_compress(f, bits=4, keep_argnums=(1,), min_size=1024)
  table = jact.residuals(lambda w, x: g(x, w, idx), ws[0], x)
  by_source = {}
  for r in table:
    by_source.setdefault(r.source, []).append(r)
  assert all(r.bits == 32 for r in by_source["parameter"])
  assert any(r.is_argument and r.name == "f/w" for r in by_source["parameter"])
  assert any(r.name == "f/x" and r.bits == 4 and r.source == "input" for r in table)
  kept = [r for r in table if r.bits == 32 and r.source in ("activation", "input")]
  assert kept and all(r.size < 1024 or not jnp.issubdtype(r.dtype, jnp.floating)
                      or r.kept_because == "per-row statistic" and r.shape[-1] == 1 for r in kept)
  assert all(r.stored_nbytes < r.nbytes for r in table if r.bits == 4)
  names = [r.name for r in table]
  assert len(names) == len(set(names))
  assert "stored" in str(table) and "f/x" in str(table)


def test_same_array_saved_twice_is_stored_once():
  sq = jact.remat_compress(lambda x: x * x, bits=2, min_size=0)
  table = jact.residuals(lambda x: jnp.sum(sq(x)), jnp.ones((64, 64)))
  assert len(table) == 1 and table[0].name == "<lambda>/x"


def test_policies_by_name_and_bad_bits():
  policy = jact.policies.by_name({"layer/x": 8, "*": 4})
  ws, x = mlp_data()
  table = jact.residuals(mlp_loss(compressed(policy)), ws[:1], x)
  bits = {r.name: r.bits for r in table if r.source != "parameter" and r.name.startswith("layer/")}
  assert bits["layer/x"] == 8 and set(bits.values()) == {8, 4}
  bad = compressed(lambda info: 3)
  with pytest.raises(ValueError, match=r"bits=3 for residual 'layer/"):
    jax.grad(mlp_loss(bad))(ws[:1], x)
  with pytest.raises(ValueError, match="bits=5"):
    jact.remat_compress(layer, bits=5)


def test_pytrees_kwargs_closures_and_aux():
  params = {"w": jnp.eye(64) * 0.5, "b": jnp.ones(64)}
  x = jax.random.normal(jax.random.key(3), (128, 64))

  def block(p, x, *, scale):
    h = jnp.tanh(x @ p["w"] + p["b"]) * scale
    return {"out": h, "aux": jnp.mean(h)}

  cblock = jact.remat_compress(block, bits=32, keep_argnums=(0,), min_size=0)

  def loss(p, x, f):
    out = f(p, x, scale=2.0)
    return jnp.sum(out["out"] ** 2), out["aux"]

  (l0, aux0), g0 = jax.value_and_grad(loss, has_aux=True)(params, x, block)
  (l1, aux1), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=2)(params, x, cblock)
  assert jnp.allclose(l0, l1) and jnp.allclose(aux0, aux1) and rel_err(g1, g0) < 1e-5

  # closing over traced parameters: their gradients flow through the closure
  def closed_loss(p, x):
    f = jact.remat_compress(lambda x: jnp.tanh(x @ p["w"]), bits=32)
    return jnp.sum(f(x) ** 2)
  expected = jax.grad(lambda p, x: jnp.sum(jnp.tanh(x @ p["w"]) ** 2))(params, x)
  assert rel_err(jax.jit(jax.grad(closed_loss))(params, x)["w"], expected["w"]) < 1e-5


def test_vmap_scan_and_checkpoint_compose():
  ws, x = mlp_data()
  f = compressed(32)
  g0 = exact_grads()
  # lax.scan over a compressed body
  stacked = jnp.stack(ws)
  scan_loss = lambda ws, x, f: jnp.mean(jax.lax.scan(lambda h, w: (f(h, w), None), x, ws)[0] ** 2)
  assert rel_err(jax.grad(scan_loss)(stacked, x, f), jnp.stack(g0)) < 1e-5
  # vmap over a batch of inputs
  per_example = lambda ws, x, f: jax.vmap(lambda xi: mlp_loss(f)(ws, xi[None]))(x)
  vm = jax.grad(lambda ws, x: jnp.mean(per_example(ws, x, f)))(ws, x)
  assert rel_err(vm, g0) < 1e-5
  # nested inside and around jax.checkpoint
  inside = jax.grad(mlp_loss(jax.checkpoint(f)))(ws, x)
  around = jax.grad(mlp_loss(jact.remat_compress(jax.checkpoint(layer), bits=32, keep_argnums=(1,))))(ws, x)
  assert rel_err(inside, g0) < 1e-5 and rel_err(around, g0) < 1e-5


def test_forward_mode_raises_a_clear_error():
  f = compressed(2)
  ws, x = mlp_data()
  with pytest.raises(TypeError, match="reverse-mode"):
    jax.jvp(lambda x: f(x, ws[0]), (x,), (x,))


def test_bad_arguments():
  with pytest.raises(ValueError, match="keep_argnums"):
    jact.remat_compress(layer, keep_argnums=(-1,))
  with pytest.raises(ValueError, match="called with 2 positional arguments"):
    jact.remat_compress(layer, keep_argnums=(5,))(jnp.ones((2, 2)), jnp.ones((2, 2)))
  with pytest.raises(TypeError, match="static_argnums"):
    jact.remat_compress(lambda x, mode: x)(jnp.ones(3), "train")
  with pytest.raises(TypeError, match="bits must be"):
    jact.remat_compress(layer, bits="two")


def test_per_row_statistics_are_kept():
  """A softmax's normaliser (one value per row) is kept; its probabilities are compressed."""
  x = jax.random.normal(jax.random.key(0), (8192, 64))  # more rows than min_size
  table = jact.residuals(jact.remat_compress(jax.nn.softmax, bits=2), x)
  rows = [r for r in table if r.shape == (8192, 1)]
  assert rows and all(r.bits == 32 for r in rows)
  assert any(r.kept_because == "per-row statistic" for r in rows)
  assert [r.bits for r in table if r.shape == (8192, 64)] == [2]


def test_residual_table_of_a_compressed_function_passed_directly():
  """`jact.residuals(remat_compress(g), x)` reports the compressed call, under jit too."""
  x = jax.random.normal(jax.random.key(0), (256, 512))
  g = jact.remat_compress(lambda x: jnp.exp(x) * 3, bits=2)
  for fn in (g, jax.jit(g)):
    (r,) = jact.residuals(fn, x)
    assert r.bits == 2 and r.stored_nbytes < r.nbytes / 8


def test_constant_residuals_are_kept():
  def f(x):
    c = jnp.broadcast_to(jnp.linspace(0.0, 1.0, 64), x.shape)  # depends on no argument
    return jnp.sin(x * c)
  table = jact.residuals(lambda x: jnp.sum(jact.remat_compress(f, bits=2, min_size=0)(x)), jnp.ones((64, 64)))
  assert all(r.bits == 32 for r in table if r.source == "constant")


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


def test_values_of_parameters_are_recomputed_not_stored():
  """A transposed weight and a constant broadcast are rebuilt in the backward pass."""
  def f(x, w):
    return jnp.tanh(x @ jnp.transpose(w)) * jnp.broadcast_to(jnp.arange(64.0), (BATCH, 64))
  ws, x = mlp_data()
  w = ws[0][:64]
  g = jact.remat_compress(f, bits=32, keep_argnums=(1,), min_size=0)
  table = jact.residuals(lambda w, x: jnp.sum(g(x, w)), w, x)
  recomputed = [r for r in table if r.recomputed]
  assert recomputed and all(r.stored_nbytes == 0 and r.source in ("parameter", "constant") for r in recomputed)
  loss = lambda fn: (lambda w, x: jnp.sum(fn(x, w) ** 2))
  assert rel_err(jax.grad(loss(g))(w, x), jax.grad(loss(f))(w, x)) < 1e-5


def test_values_of_index_inputs_are_recomputed_unless_their_inputs_are_larger():
  """Integer inputs (a graph's edges) are alive anyway: values computed from them alone -- edge
  chunks that a loop over activations slices, per-edge weights -- are rebuilt in the backward
  pass, not stored. A value that would keep alive more bytes of index inputs than it has itself
  (a mask from a slice of labels the backward pass needs nothing else of) is stored. Gradients
  are exact at 32 bits; at 8 bits the loop runs with its body compressed (the edge weights enter
  it as floats without a gradient) and gradients stay within the codec's error."""
  num_nodes, num_edges, chunks = 512, 4096, 8

  def f(x, senders, receivers, labels):
    degree = jax.ops.segment_sum(jnp.ones(num_edges), receivers, num_nodes)
    weights = (jax.lax.rsqrt(degree)[senders] * jax.lax.rsqrt(degree)[receivers])[:, None]
    edges = (senders.reshape(chunks, -1), receivers.reshape(chunks, -1), weights.reshape(chunks, -1, 1))

    def add_chunk(total, edge):
      s, r, w = edge
      return total.at[r].add(jnp.tanh(x[s] + total[s]) * w), None

    total, _ = jax.lax.scan(add_chunk, jnp.zeros_like(x), edges)
    mask = (labels[:num_nodes] % 2).astype(x.dtype)  # 1/8 of the labels' bytes
    return total * jnp.sum(x[:, 0] * mask)

  x = jax.random.normal(jax.random.key(0), (num_nodes, 64))
  senders, receivers, labels = (jax.random.randint(k, (num_edges,), 0, num_nodes)
                                for k in jax.random.split(jax.random.key(1), 3))
  g = jact.remat_compress(f, bits=32, min_size=0)
  table = jact.residuals(lambda x: jnp.sum(g(x, senders, receivers, labels)), x)
  chunked = [r for r in table if r.shape == (chunks, num_edges // chunks, 1)]
  assert len(chunked) >= 3 and all(r.source == "index" and r.recomputed and r.stored_nbytes == 0
                                   for r in chunked), table
  assert [(r.shape, r.recomputed) for r in table if r.source == "index" and r not in chunked] == [
      ((num_nodes,), False)], table
  loss = lambda fn: (lambda x: jnp.sum(fn(x, senders, receivers, labels) ** 2))
  exact = jax.grad(loss(f))(x)
  assert rel_err(jax.grad(loss(g))(x), exact) < 1e-5
  # Compressed, the loop's per-chunk derivatives run through its body compressed on its own, which
  # takes the edge weights (floats of index inputs) as values that carry no gradient.
  for bits, bound in ((32, 1e-5), (8, 0.02)):
    g = jact.remat_compress(f, bits=bits, min_size=0)
    assert rel_err(jax.grad(loss(g))(x), exact) < bound, bits
  assert not [r for r in jact.residuals(lambda x: jnp.sum(g(x, senders, receivers, labels)), x)
              if r.stacked_by_loop and r.compressed]


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


def test_what_a_nested_compressed_call_stores_is_kept_as_it_is():
  """A compressed call inside another: the inner call's codes and bounds are residuals of the
  outer one, which keeps them as they are (rounding a group's bounds again would break its
  decoding) and says why; the outer call compresses only its own residuals."""
  inner = jact.remat_compress(lambda x, w: jnp.tanh(x @ w), bits=8, keep_argnums=(1,), name="inner")
  outer = jact.remat_compress(lambda x, w: jnp.sin(inner(x, w)) @ w, bits=2, keep_argnums=(1,),
                              min_size=0, name="outer")
  ws, x = mlp_data()
  table = jact.residuals(lambda x, w: jnp.sum(outer(x, w)), x, ws[0])
  nested = [r for r in table if r.kept_because == "stored by a nested compressed call"]
  assert {r.dtype for r in nested} == {jnp.dtype(jnp.uint8), jnp.dtype(jnp.bfloat16)}, table
  assert all(r.bits == 32 and r.name.startswith("outer/nested") for r in nested)
  assert {r.name for r in table if r.compressed} == {"outer/sin0", "outer/cos0"}, table


def test_divisors_are_kept():
  """A residual the backward pass divides by is kept: rounding it would bias the gradient."""
  f = jact.remat_compress(lambda x: x / jnp.sum(x * x, axis=-1, keepdims=True), bits=2, min_size=0)
  table = jact.residuals(lambda x: jnp.sum(f(x)), jnp.ones((64, 128)))
  assert any(r.kept_because == "nonlinear in backward" for r in table)


def test_recompute_stores_only_compressed_inputs():
  ws, x = mlp_data()
  f = compressed(2, recompute=True)
  table = jact.residuals(mlp_loss(f), ws, x)
  layer_rows = [r for r in table if r.name.startswith("layer/")]
  assert {r.name for r in layer_rows} == {"layer/x", "layer/w"}
  assert all(r.bits == 2 for r in layer_rows if r.name == "layer/x")
  assert rel_err(jax.grad(mlp_loss(compressed(32, recompute=True)))(ws, x), exact_grads()) < 1e-5
  err8 = rel_err(jax.grad(mlp_loss(compressed(8, recompute=True)))(ws, x), exact_grads())
  assert err8 < 0.05  # the 8-bit codec's relative error (about 1%) through four layers


@pytest.mark.parametrize("slope, two_valued", [(0.0, True), (0.25, True), (0.1, False)])
def test_masks_are_stored_exactly_at_1_bit(slope, two_valued):
  """A (leaky) ReLU-like factor takes two values: stored at 1 bit whatever the policy, with no
  error, when 1-bit codes represent both exactly (0.1 is not a bfloat16 number)."""
  ws, x = mlp_data()

  def f(x):  # the factor is the only residual the gradient in x reads (x itself is for the weight's)
    h = x @ ws[0]
    return h * jnp.where(h > 0, 2.0, slope)

  g = jact.remat_compress(f, bits=8)
  (info,) = [r for r in jact.residuals(lambda x: jnp.sum(g(x)), x) if r.compressed and not r.is_argument]
  assert info.two_valued == two_valued and info.bits == (1 if two_valued else 8), info
  loss = lambda f: lambda x, **kw: jnp.sum(f(x, **kw) ** 2)
  exact = jax.grad(loss(f))(x)
  for seed in range(3):
    grads = jax.grad(loss(g))(x, rng=seed)
    if two_valued:
      assert jnp.array_equal(grads, exact)
    else:
      assert not jnp.array_equal(grads, exact)  # stored at 8 bits: rounded



def _count(jaxpr, primitive: str) -> int:
  """Equations of `primitive` in a jaxpr and every jaxpr nested in it."""
  from jax.extend import core
  return sum((eqn.primitive.name == primitive)
             + sum(_count(sub, primitive) for sub in core.jaxprs_in_params(eqn.params)) for eqn in jaxpr.eqns)


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
