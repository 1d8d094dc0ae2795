"""remat_compress: exact at 32 bits, error proportional to the codec step, unbiased, composable."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jact
from small_mlp import layer, conv_layer, mlp_data, mlp_loss, rel_err, compressed, exact_grads


def stochastic_error(bits, seeds):
  """RMS relative gradient error over seeds, and the mean gradient."""
  ws, x = mlp_data()
  f = compressed(bits)
  grad = jax.jit(lambda ws, x, rng: jax.grad(mlp_loss(f))(ws, x, rng=rng))
  gs = [grad(ws, x, jax.random.key(s)) for s in seeds]
  g0 = exact_grads()
  errs = [rel_err(g, g0) for g in gs]
  return float(np.sqrt(np.mean(np.square(errs)))), gs


def test_bits32_gradients_equal_plain_grad():
  ws, x = mlp_data()
  g = jax.jit(jax.grad(mlp_loss(compressed(32))))(ws, x)
  assert rel_err(g, exact_grads()) < 1e-5  # float32 reassociation only
  kc = jax.random.normal(jax.random.key(1), (3, 3, 8, 8)) / 5
  xc = jax.random.normal(jax.random.key(2), (4, 16, 16, 8))
  conv_loss = lambda k, x, f: jnp.sum(f(x, k) ** 2)
  gc = jax.grad(conv_loss)(kc, xc, jact.remat_compress(conv_layer, bits=32, keep_argnums=(1,)))
  assert rel_err(gc, jax.grad(conv_loss)(kc, xc, conv_layer)) < 1e-5


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


def test_forward_mode_runs_the_function_as_it_is():
  """jvp and jacfwd keep no residuals: the compressed function's are the plain function's (up to
  float32 rounding: a rewritten chain computes GELU's derivative in another order)."""
  f = compressed(2)
  ws, x = mlp_data()
  compressed_jvp = jax.jvp(lambda x: f(x, ws[0]), (x,), (x,))
  plain_jvp = jax.jvp(lambda x: layer(x, ws[0]), (x,), (x,))
  assert rel_err(compressed_jvp[1], plain_jvp[1]) < 1e-5
  small = jact.remat_compress(jnp.tanh, bits=2, min_size=0)
  np.testing.assert_array_equal(jax.jacfwd(small)(x[0, :16]), jax.jacfwd(jnp.tanh)(x[0, :16]))


def test_second_order_differentiation_is_exact():
  """Differentiating the backward pass (grad of grad, hessian, Hessian-vector products) gives the
  exact derivative, computed from the call's own inputs: a rounded residual would carry no
  derivative of its input. No warning: memory is saved in the first-order pass as always. A
  gradient penalty multiplies that exact derivative by the first-order gradient, which the stored
  8-bit residuals give: within the codec's step (1/255 of a group's range)."""
  plain = lambda x: jnp.cos(jnp.sin(x))
  g = jact.remat_compress(plain, bits=8, min_size=0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert float(jax.grad(jax.grad(g))(3.0)) == pytest.approx(float(jax.grad(jax.grad(plain))(3.0)), rel=1e-6)
    f = lambda x: jnp.sum(jnp.tanh(x) ** 2)
    x = jnp.linspace(-2, 2, 5000)
    v = jnp.cos(x)
    hvp = lambda f: jax.grad(lambda x: jnp.vdot(jax.grad(f)(x), v))(x)
    hessian = lambda f: jax.hessian(f)(x[:300])
    penalty = lambda f: jax.grad(lambda x: f(x) + jnp.sum(jax.grad(f)(x) ** 2))(x)  # WGAN-GP-like
    for second_order in (hvp, hessian):
      assert rel_err(second_order(jact.remat_compress(f, bits=8)), second_order(f)) < 1e-5
    assert rel_err(penalty(jact.remat_compress(f, bits=32)), penalty(f)) < 1e-5
    assert 0 < rel_err(penalty(jact.remat_compress(f, bits=8)), penalty(f)) < 1 / 255


def test_bad_arguments():
  with pytest.raises(ValueError, match="keep_argnums"):
    jact.remat_compress(layer, keep_argnums=(-1,))
  with pytest.raises(ValueError, match="called with 2 positional arguments"):
    jact.remat_compress(layer, keep_argnums=(5,))(jnp.ones((2, 2)), jnp.ones((2, 2)))
  with pytest.raises(TypeError, match="bits must be"):
    jact.remat_compress(layer, bits="two")


def test_non_array_arguments_are_static():
  """Functions, strings, None, Python bools and ints pass through as they are (as Equinox's
  filter_jit treats them), anywhere in the argument tree; they select the trace, like static
  arguments (True and 1 are different values here); arrays and Python floats are traced."""
  traces = []

  def f(x, config, *, train):
    traces.append((config["act"], config["mode"], config["n"], train))
    y = config["act"](x) * config["n"]
    return y if train else -y

  g = jact.remat_compress(f, bits=8, min_size=0)
  x = jax.random.normal(jax.random.key(0), (64, 64))
  config = {"act": jnp.tanh, "mode": "train", "n": 3, "unused": None}
  for train in (True, True, False, 1):
    np.testing.assert_allclose(g(x, config, train=train), f(x, config, train=train), rtol=1e-6)
  assert len(traces) == 4 + 3  # f's own 4 calls; g traces for True, False and 1
  grad = jax.grad(lambda x, scale: jnp.sum(g(x * scale, config, train=True) ** 2), argnums=(0, 1))(x, 2.0)
  want = jax.grad(lambda x, scale: jnp.sum(f(x * scale, config, train=True) ** 2), argnums=(0, 1))(x, 2.0)
  assert rel_err(grad, want) < 4 / 255


def test_a_traced_argument_needed_as_a_python_value_is_named():
  """A Python float is traced; used in an `if`, the error names it and says what to do."""
  def f(x, rate):
    return x * 2 if rate > 0.5 else x

  with pytest.raises(TypeError, match=r"f: .*Python number argument\(s\) rate are traced.*static_argnums"):
    jact.remat_compress(f)(jnp.ones(3), 0.7)
  np.testing.assert_allclose(jact.remat_compress(f, static_argnums=(1,))(jnp.ones(3), 0.7), 2 * np.ones(3))


def test_repeated_calls_get_distinct_stable_names():
  """The n-th call of one wrapped function in a traced computation is scoped `name_n` (the
  first keeps `name`), the same at every trace; named scopes and an explicit name= decide
  instead; a lax.scan body is one body."""
  layer = jact.remat_compress(lambda x, w: jnp.tanh(x @ w), bits=8, keep_argnums=(1,), min_size=0, name=None)
  named = jact.remat_compress(lambda x, w: jnp.tanh(x @ w), bits=8, keep_argnums=(1,), min_size=0, name="shared")
  ws, x = mlp_data()

  def loss(ws, x):
    for w in ws[:3]:
      x = layer(x, w)
    with jax.named_scope("head"):
      x = layer(x, ws[3])
    x = jax.lax.scan(lambda h, w: (layer(h, w), None), x, jnp.stack(ws[:2]))[0]
    x = named(named(x, ws[0]), ws[1])
    return jnp.sum(x)

  scopes = lambda: [r.name.rsplit("/", 1)[0] for r in jact.residuals(loss, ws, x) if r.name.endswith("/x")]
  expected = ["<lambda>", "<lambda>_1", "<lambda>_2", "head/<lambda>", "<lambda>_3", "shared", "shared"]
  assert scopes() == expected
  assert scopes() == expected  # traced again: the same names
  policy = jact.policies.by_name({"<lambda>_1/*": 4})
  with jact.use_policy(policy):
    table = jact.residuals(loss, ws, x)
  assert {r.name.split("/")[0]: r.bits for r in table if r.compressed}["<lambda>_1"] == 4


def test_calls_named_apart_store_apart():
  """Two calls of one function given different widths by name are compiled apart: the second
  call's input gradient, which only its own residuals carry, is exact at 32 bits while the first
  call rounds at 2 (shared rules would round both or neither)."""
  plain = lambda x, w: jnp.tanh(x @ w)
  ws, x = mlp_data()
  loss_of = lambda layer: lambda a, b: jnp.sum(layer(a, ws[0]) ** 2) + jnp.sum(layer(b, ws[0]) ** 2)
  loss = loss_of(jact.remat_compress(plain, keep_argnums=(1,), min_size=0))
  exact = jax.grad(loss_of(plain), argnums=(0, 1))(x, x)
  with jact.use_policy(jact.policies.by_name({"<lambda>/*": 2, "<lambda>_1/*": 32})):
    first, second = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, x)
  assert rel_err(second, exact[1]) < 1e-6
  assert rel_err(first, exact[0]) > 1e-3


def test_residual_table_of_a_compressed_function_passed_directly():
  """`jact.residuals(remat_compress(g), x)` reports the compressed call, under jit too."""
  x = jax.random.normal(jax.random.key(0), (256, 512))
  g = jact.remat_compress(lambda x: jnp.exp(x) * 3, bits=2)
  for fn in (g, jax.jit(g)):
    (r,) = jact.residuals(fn, x)
    assert r.bits == 2 and r.stored_nbytes < r.nbytes / 8


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


def test_eager_calls_trace_once_per_signature():
  """Like jax.jit: same shapes, dtypes and static values reuse the traced plan; jact.clear_caches
  forgets it."""
  traces = []

  def f(x, w, scale):
    traces.append(scale)
    return jnp.tanh(x @ w) * scale

  g = jact.remat_compress(f, bits=8, keep_argnums=(1,), static_argnums=(2,), min_size=0)
  x, w = jnp.ones((64, 64)), jnp.ones((64, 64)) / 64
  expected = f(x, w, 2.0)
  traces.clear()
  for _ in range(10):
    np.testing.assert_array_equal(g(x, w, 2.0), expected)
  assert len(traces) == 1
  g(x, w, 3.0)  # a new static value
  g(jnp.ones((32, 64)), w, 2.0)  # a new shape
  assert len(traces) == 3
  jax.grad(lambda x: g(x, w, 2.0).sum())(x)  # under a transformation: traced with it
  assert len(traces) == 4
  jact.clear_caches()
  g(x, w, 2.0)
  assert len(traces) == 5
