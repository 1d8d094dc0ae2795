"""What each residual becomes: kept, recomputed, stored once, at 1 bit, or compressed (jact._classify, jact._plan)."""

import jax
import jax.numpy as jnp
import pytest

import jact
from small_mlp import WIDTH, BATCH, mlp_data, rel_err, compressed


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


def test_per_row_statistics_are_kept():
  """A softmax's normaliser (one value per row) is kept; its probabilities are compressed.

  (Written out with the normaliser's reciprocal, which its derivative uses linearly: jax.nn.softmax
  has a custom_jvp that stores only its output.)"""
  def softmax(x):
    e = jnp.exp(x - jax.lax.stop_gradient(x.max(-1, keepdims=True)))
    return e * jax.lax.integer_pow(e.sum(-1, keepdims=True), -1)

  x = jax.random.normal(jax.random.key(0), (8192, 64))  # more rows than min_size
  table = jact.residuals(jact.remat_compress(softmax, bits=2), x)
  rows = [r for r in table if r.shape == (8192, 1)]
  assert rows and all(r.bits == 32 for r in rows)
  assert any(r.kept_because == "per-row statistic" for r in rows)
  assert [r.bits for r in table if r.shape == (8192, 64)] == [2]


def test_constant_residuals_are_kept():
  def f(x):
    c = jnp.broadcast_to(jnp.linspace(0.0, 1.0, 64), x.shape)  # depends on no argument
    return jnp.sin(x * c)
  table = jact.residuals(lambda x: jnp.sum(jact.remat_compress(f, bits=2, min_size=0)(x)), jnp.ones((64, 64)))
  assert all(r.bits == 32 for r in table if r.source == "constant")


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


def test_divisors_are_kept():
  """A residual the backward pass divides by is kept: rounding it would bias the gradient."""
  f = jact.remat_compress(lambda x: x / jnp.sum(x * x, axis=-1, keepdims=True), bits=2, min_size=0)
  table = jact.residuals(lambda x: jnp.sum(f(x)), jnp.ones((64, 128)))
  assert any(r.kept_because == "nonlinear in backward" for r in table)


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
