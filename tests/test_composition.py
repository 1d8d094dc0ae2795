"""remat_compress composes with every JAX transform, as jax.checkpoint does (issue 17).

The idea of JAX's own jax.checkpoint tests, ported: each case differentiates a function with a
compressed part and the same function without compression, and compares. At bits=32 nothing is
rounded, so the gradients must agree to float32 rounding (relative error < 1e-5 of the gradient's
norm). At bits=8 with min_size=0 (so that these small arrays really are compressed) they must
agree within the codec's noise, and the error must not be zero, or nothing was compressed and the
case tested nothing. The noise: 8-bit stochastic rounding moves each value by less than one step,
1/255 of its group's range, with an RMS of about 0.41 steps; a group of 256 Gaussian values spans
about 5.6 standard deviations, so one Gaussian residual comes back with a relative error of
0.41 * 5.6 / 255 = 2.3/255 (jact.quantize measures 2.36/255). A gradient that one layer's
residuals (input, weight, derivative) all perturb lands at 2.2/255-2.6/255 here, three such
layers (lax.scan, fori_loop) at 2.5/255, unrolled or not, for every seed (and the mean of 16
seeds' gradients is 4x closer, as unbiased noise should be): the bound is 4/255; 2/255 would fail
honest cases. Rounding noise is selected by a fixed `rng` key, so every case is deterministic.

Forward mode evaluates the exact JVP, and the derivative of a compressed backward pass is the
exact one: jvp, jacfwd, jax.linearize, grad of grad, jax.hessian and Hessian-vector products are
exact at both widths, through jit, vmap, scan, cond and checkpoint too (the transpose of a
linearised function is the compressed backward pass: within the codec's noise); a gradient
penalty is within the codec's noise, unbiased.
"""

import contextlib
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.ad_checkpoint import checkpoint_name

import jact
from tree_math import relative_error, tree_norm

BITS = [32, 8]
TOLERANCE = {32: 1e-5, 8: 4 / 255}
EXACT = 1e-5  # float32 rounding: forward mode and second order keep no rounded residual
N, D = 32, 64  # x is (N, D): 2048 elements, 8 groups of 256; w is (D, D)


def data(seed=0):
  kx, kw, kv = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (N, D))
  w = jax.random.normal(kw, (D, D)) / D**0.5
  return x, w, jax.random.normal(kv, (N, D))


def compressor(bits, seed=0):
  """`wrap(f, **options)`: f compressed at `bits` with min_size=0 and a fixed rounding seed."""
  def wrap(f, **options):
    g = jact.remat_compress(f, bits=bits, min_size=0, **options)
    return functools.partial(g, rng=jax.random.key(seed))
  return wrap


def plain(f, **options):
  """The uncompressed counterpart of `compressor(bits)`."""
  return f


def assert_close(actual, expected, bits, *, compressed=True):
  """Within TOLERANCE[bits]; at 8 bits, with `compressed`, not exactly equal either."""
  assert tree_norm(expected) > 0
  err = relative_error(actual, expected)
  assert np.isfinite(err) and err < TOLERANCE[bits], f"relative error {err:.3g} at bits={bits}"
  if bits == 8 and compressed:
    assert err > 1e-6, f"relative error {err:.3g} at bits=8: nothing was compressed"
  return err


def assert_exact(actual, expected):
  assert tree_norm(expected) > 0
  err = relative_error(actual, expected)
  assert err < EXACT, f"relative error {err:.3g}, expected float32 rounding only"


def compare_grads(make_loss, args, bits, argnums=None, *, jit=True, compressed=True, more_args=()):
  """The gradient of `make_loss(wrap)` with `wrap` compressing against `make_loss(plain)`, at
  `args` and at each tuple in `more_args` (with the same jitted functions: compiled once)."""
  argnums = tuple(range(len(args))) if argnums is None else argnums
  grad = lambda wrap: jax.grad(make_loss(wrap), argnums=argnums)
  actual_fn, expected_fn = grad(compressor(bits)), grad(plain)
  if jit:
    actual_fn, expected_fn = jax.jit(actual_fn), jax.jit(expected_fn)
  for a in (args, *more_args):
    assert_close(actual_fn(*a), expected_fn(*a), bits, compressed=compressed)


# --- closures ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
def test_closure_over_tracers(bits):
  """A compressed function defined inside a jitted / differentiated function, closing over traced
  parameters (whose gradients flow through the closure) and over a vmapped example."""
  x, w, _ = data()
  params = {"w": w, "s": jnp.float32(1.5)}

  def make_loss(wrap):
    def loss(p, x):
      f = wrap(lambda x: jnp.tanh(x @ p["w"]) * p["s"])
      return jnp.sum(f(x) ** 2)
    return loss

  compare_grads(make_loss, (params, x), bits)               # under jit(grad)
  compare_grads(make_loss, (params, x), bits, jit=False)    # under grad alone

  def make_batched(wrap):
    def loss(w, x):
      # Each example is a batched tracer the compressed function closes over.
      per_example = jax.vmap(lambda xi: jnp.sum(wrap(lambda w: jnp.sin(xi @ w) * xi)(w) ** 2))
      return jnp.sum(per_example(x))
    return loss

  compare_grads(make_batched, (w, x), bits, argnums=(0, 1))


# --- control flow inside the compressed function ---------------------------------------------------

def scan_inside(x, ws):
  return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]


def cond_inside(x, w):
  # The cond's own residuals are kept (its backward pass uses them inside a cond, which jact does
  # not prove linear); the layer before it is compressed.
  h = jnp.tanh(x @ w)
  return lax.cond(jnp.sum(x) > 0, lambda h: jnp.sin(h) * h, lambda h: h**3, h)


def fori_inside(x, w):
  # Static trip count: JAX lowers it to a scan, which it differentiates.
  return lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ w + i), x)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("fun", [scan_inside, cond_inside, fori_inside], ids=["scan", "cond", "fori_loop"])
def test_control_flow_inside(fun, bits):
  x, w, _ = data()
  second = jnp.stack([w, w.T, -w]) if fun is scan_inside else w
  make_loss = lambda wrap: lambda x, w: jnp.sum(wrap(fun)(x, w) ** 2)
  other_branch = [(-x, second)] if fun is cond_inside else []
  compare_grads(make_loss, (x, second), bits, more_args=other_branch)


@pytest.mark.parametrize("bits", BITS)
def test_switch_inside(bits):
  """lax.switch on an integer argument (an index input, never compressed)."""
  x, w, _ = data()

  def fun(i, x, w):
    h = jnp.tanh(x @ w)  # compressed; the switch's own residuals are kept, as for cond
    return lax.switch(i, [lambda h: jnp.sin(h) * h, lambda h: h**3, jax.nn.sigmoid], h)

  make_loss = lambda wrap: lambda x, w, i: jnp.sum(wrap(fun)(i, x, w) ** 2)
  compare_grads(make_loss, (x, w, jnp.int32(0)), bits, argnums=(0, 1),
                more_args=[(x, w, jnp.int32(1)), (x, w, jnp.int32(2))])


@pytest.mark.parametrize("bits", BITS)
def test_while_loop_inside(bits):
  """Forward and forward mode (jvp, under jit, linearize) run; reverse mode raises JAX's own error,
  as for the plain function."""
  x, w, v = data()

  def fun(x, w):
    return lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)), (0, x))[1]

  g = compressor(bits)(fun)
  assert_exact(g(x, w), fun(x, w))
  assert_exact(jax.jvp(lambda x: g(x, w), (x,), (v,)), jax.jvp(lambda x: fun(x, w), (x,), (v,)))
  jitted_jvp = jax.jit(lambda x, v: jax.jvp(lambda x: g(x, w), (x,), (v,))[1])  # no plan is needed
  assert_exact(jitted_jvp(x, v), jax.jvp(lambda x: fun(x, w), (x,), (v,))[1])
  assert_exact(jax.linearize(lambda x: g(x, w), x)[1](v), jax.linearize(lambda x: fun(x, w), x)[1](v))
  with pytest.raises(ValueError) as plain_error:
    jax.grad(lambda x: jnp.sum(fun(x, w)))(x)
  with pytest.raises(ValueError) as compressed_error:
    jax.grad(lambda x: jnp.sum(g(x, w)))(x)
  assert "Reverse-mode differentiation does not work for lax.while_loop" in str(plain_error.value)
  assert str(compressed_error.value) == str(plain_error.value)


# --- compressed functions inside control flow --------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
def test_compressed_inside_scan_cond_and_fori_loop(bits):
  x, w, _ = data()
  ws = jnp.stack([w, w.T, -w])

  def make_scan(wrap):
    layer = wrap(lambda h, w: jnp.tanh(h @ w), keep_argnums=(1,))
    return lambda x, ws: jnp.sum(lax.scan(lambda h, w: (layer(h, w), None), x, ws)[0] ** 2)

  def make_cond(wrap):
    first = wrap(lambda x, w: jnp.tanh(x @ w))
    second = wrap(lambda x, w: jnp.sin(x) @ w)
    return lambda x, w: jnp.sum(lax.cond(jnp.sum(x) > 0, first, second, x, w) ** 2)

  def make_fori(wrap):
    layer = wrap(lambda h, w: jnp.tanh(h @ w), keep_argnums=(1,))
    return lambda x, w: jnp.sum(lax.fori_loop(0, 3, lambda i, h: layer(h, w), x) ** 2)

  compare_grads(make_scan, (x, ws), bits)
  compare_grads(make_cond, (x, w), bits, more_args=[(-x, w)])
  compare_grads(make_fori, (x, w), bits)


# --- custom derivative rules inside -----------------------------------------------------------------

@jax.custom_vjp
def scaled_tanh(x):
  return 2 * jnp.tanh(x)


def _scaled_tanh_fwd(x):
  y = jnp.tanh(x)
  return 2 * y, y  # the residual is the output, which the backward pass uses nonlinearly


scaled_tanh.defvjp(_scaled_tanh_fwd, lambda y, g: (2 * g * (1 - y**2),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def clip_gradient(x, bound):
  return x


clip_gradient.defvjp(lambda x, bound: (x, None), lambda bound, _, g: (jnp.clip(g, -bound, bound),))


@jax.custom_jvp
def softplus(x):
  return jnp.logaddexp(x, 0.0)


softplus.defjvp(lambda primals, tangents: (softplus(primals[0]), jax.nn.sigmoid(primals[0]) * tangents[0]))


@pytest.mark.parametrize("bits", BITS)
def test_custom_jvp_and_custom_vjp_inside(bits):
  x, w, _ = data()

  def fun(x, w):
    h = x @ w
    out = jax.nn.relu(h) + jax.nn.gelu(h) + jax.nn.softmax(h) + softplus(h) + scaled_tanh(h)
    return clip_gradient(out * h, 0.05)

  make_loss = lambda wrap: lambda x, w: jnp.sum(wrap(fun, keep_argnums=(1,))(x, w) ** 2)
  compare_grads(make_loss, (x, w), bits)


# --- vmap ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
def test_vmap_of_grad_and_grad_of_vmap(bits):
  """Per-example gradients (vmap of grad), grad of a vmapped function, and vmap over weights."""
  x, w, _ = data()
  fun = lambda x, w: jax.nn.gelu(jnp.sin(x) @ w)

  def make_per_example(wrap):
    example_loss = lambda w, xi: jnp.sum(wrap(fun, keep_argnums=(1,))(xi, w) ** 2)
    return jax.vmap(jax.grad(example_loss, argnums=(0, 1)), in_axes=(None, 0))

  per_example = [jax.jit(make_per_example(wrap))(w, x) for wrap in (compressor(bits), plain)]
  assert per_example[0][0].shape == (N, D, D)
  assert_close(*per_example, bits)

  def make_batched(wrap):
    return lambda w, x: jnp.sum(jax.vmap(wrap(fun, keep_argnums=(1,)), in_axes=(0, None))(x, w) ** 2)

  compare_grads(make_batched, (w, x), bits)

  def make_ensemble(wrap):  # vmapped weights: keep_argnums is batched too
    return lambda ws, x: jnp.sum(jax.vmap(wrap(fun, keep_argnums=(1,)), in_axes=(None, 0))(x, ws) ** 2)

  compare_grads(make_ensemble, (jnp.stack([w, -w]), x), bits)


# --- jit -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
def test_jit_inside_and_outside(bits):
  x, w, _ = data()
  dense = jax.jit(lambda x, w: jnp.tanh(x @ w))
  fun = lambda x, w: jax.jit(jnp.sin)(dense(x, w)) @ w  # calls jitted helpers
  make_loss = lambda wrap: lambda x, w: jnp.sum(wrap(fun)(x, w) ** 2)
  compare_grads(make_loss, (x, w), bits, jit=True)   # jit(grad(...)) outside
  # the compressed function itself jitted, then differentiated
  make_jitted = lambda wrap: lambda x, w: jnp.sum(jax.jit(wrap(fun))(x, w) ** 2)
  compare_grads(make_jitted, (x, w), bits, jit=False)


# --- pytrees and keyword arguments ---------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
def test_pytrees_and_keyword_arguments(bits):
  x, w, v = data()
  params = {"dense": (w, jnp.linspace(-1, 1, D)), "gate": {"w": w.T}}
  inputs = (x, {"y": v, "ys": [jnp.cos(x)]})

  def block(params, inputs, *, bias, scale):
    x, rest = inputs
    w, b = params["dense"]
    h = jnp.tanh(x @ w + b + bias)
    gate = jax.nn.sigmoid((rest["y"] + rest["ys"][0]) @ params["gate"]["w"])
    return {"out": h * gate * scale, "pair": (jnp.sum(h, axis=0), [jnp.sin(gate)])}

  def make_loss(wrap):
    f = wrap(block, keep_argnums=(0,))

    def loss(params, inputs, bias):
      out = f(params, inputs, bias=bias, scale=2.0)
      return jnp.sum(out["out"] ** 2) + jnp.sum(out["pair"][0] ** 2) + jnp.sum(out["pair"][1][0])
    return loss

  compare_grads(make_loss, (params, inputs, jnp.full((D,), 0.1)), bits)
  # the outputs' structure and values (the forward pass is never rounded)
  out = compressor(bits)(block, keep_argnums=(0,))(params, inputs, bias=0.1, scale=2.0)
  expected = block(params, inputs, bias=0.1, scale=2.0)
  assert jax.tree.structure(out) == jax.tree.structure(expected)
  assert_exact(out, expected)


# --- static arguments ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
def test_static_arguments(bits):
  """Hashable static values (a string, a float) select different traces; unhashable ones (a dict,
  a list) work too: they are not cached, so new contents take effect at once."""
  x, w, _ = data()

  def fun(x, w, config, activation):
    act = {"tanh": jnp.tanh, "sin": jnp.sin}[activation]
    scale = config["scale"] if isinstance(config, dict) else config[0] if isinstance(config, list) else config
    return act(x @ w) * scale

  def make_loss(config, activation):
    def make(wrap):
      f = wrap(fun, keep_argnums=(1,), static_argnums=(2, 3))
      return lambda x, w: jnp.sum(f(x, w, config, activation) ** 2)
    return make

  for config, activation in ((2.0, "tanh"), ({"scale": 2.0}, "sin"), ([3.0], "tanh")):
    compare_grads(make_loss(config, activation), (x, w), bits, jit=False)

  # One compressed function called eagerly with changing static values, hashable or not; in the
  # second round the hashable ones come from the trace cache and the dict has new contents.
  f = compressor(bits)(fun, keep_argnums=(1,), static_argnums=(2, 3))
  config = {"scale": 2.0}
  for _ in range(2):
    for static in (2.0, 3.0, [2.0], [3.0], config):
      for activation in ("tanh", "sin"):
        assert_exact(f(x, w, static, activation), fun(x, w, static, activation))
        grads = [jax.grad(lambda x, w: jnp.sum(g(x, w, static, activation) ** 2), argnums=(0, 1))(x, w)
                 for g in (f, fun)]
        assert_close(*grads, bits)
    config["scale"] = 3.0


# --- nested compressed calls ---------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
def test_nested_compressed_calls(bits):
  x, w, _ = data()

  def make_loss(wrap):
    inner = wrap(lambda x, w: jnp.tanh(x @ w), keep_argnums=(1,))
    outer = wrap(lambda x, w: jnp.sin(inner(x, w)) @ inner(w, w), keep_argnums=(1,))
    twice = wrap(wrap(lambda x: jax.nn.gelu(x) * x))  # compressing a compressed function
    return lambda x, w: jnp.sum(twice(outer(x, w)) ** 2)

  compare_grads(make_loss, (x, w), bits)


# --- names -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
def test_named_call_named_scope_and_checkpoint_name_inside(bits):
  x, w, _ = data()

  def fun(x, w):
    with jax.named_scope("block"):
      h = checkpoint_name(x @ w, "pre")
      h = jax.named_call(jnp.tanh, name="activation")(h)
    return checkpoint_name(jnp.sin(h) * h, "post")

  make_loss = lambda wrap: lambda x, w: jnp.sum(wrap(fun)(x, w) ** 2)
  compare_grads(make_loss, (x, w), bits)
  # and the compressed call inside a named scope and a named call
  make_named = lambda wrap: lambda x, w: jnp.sum(jax.named_call(wrap(fun), name="outer")(x, w) ** 2)
  compare_grads(make_named, (x, w), bits)


# --- jax.checkpoint --------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
def test_checkpoint_around_and_inside(bits):
  x, w, _ = data()

  def fun(x, w):
    h = checkpoint_name(jnp.tanh(x @ w), "h")
    return jnp.sin(h) @ w

  save_h = jax.checkpoint_policies.save_only_these_names("h")
  # Around jax.checkpoint, the residuals are the inputs of the recomputation, which uses them
  # nonlinearly: jact keeps them as they are (its documented rule), so 8 bits are exact there.
  variants = {
      "checkpoint(compressed)": (lambda wrap: jax.checkpoint(
          wrap(fun), policy=jax.checkpoint_policies.nothing_saveable), True),
      "compressed(checkpoint), names saved": (lambda wrap: wrap(jax.checkpoint(fun, policy=save_h)), False),
  }
  for name, (variant, compressed) in variants.items():
    make_loss = lambda wrap: lambda x, w: jnp.sum(variant(wrap)(x, w) ** 2)
    compare_grads(make_loss, (x, w), bits, compressed=compressed)


# --- forward mode and second order ------------------------------------------------------------------

def smooth(x):
  return jnp.sum(jnp.tanh(x) ** 2 * jnp.sin(x))


@pytest.mark.parametrize("bits", BITS)
def test_forward_mode_is_exact(bits):
  """jvp and jacfwd (also under vmap and jit) run the function as it is."""
  x, w, v = data()
  fun = lambda x, w: jax.nn.gelu(x @ w) * jnp.cos(x)
  g = compressor(bits)(fun, keep_argnums=(1,))
  jvp = lambda f: jax.jvp(f, (x, w), (v, w.T))
  assert_exact(jvp(g), jvp(fun))
  assert_exact(jax.jit(lambda x, v: jax.jvp(g, (x, w), (v, w))[1])(x, v), jax.jvp(fun, (x, w), (v, w))[1])
  batched = lambda f: jax.vmap(lambda xi, vi: jax.jvp(lambda xi: f(xi[None], w), (xi,), (vi,))[1])(x, v)
  assert_exact(batched(g), batched(fun))
  small = x[0, :48]
  s = compressor(bits)(smooth)
  assert_exact(jax.jacfwd(s)(small), jax.jacfwd(smooth)(small))
  assert_exact(jax.jit(jax.jacfwd(lambda x: g(x, w)))(x[:2]), jax.jacfwd(lambda x: fun(x, w))(x[:2]))


@contextlib.contextmanager
def no_warning():
  """Second order needs no warning: the first-order pass stores compressed as always."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    yield


@pytest.mark.parametrize("bits", BITS)
def test_second_order_is_exact(bits):
  """grad of grad, jax.hessian and a Hessian-vector product, also under jit: the derivative of a
  compressed backward pass is the exact one (taken from the call's own inputs), so these are
  exact at both widths. A gradient penalty multiplies it by the first-order gradient, which the
  stored residuals give: within the codec's noise, and not exact at 8 bits."""
  x = jnp.linspace(-2, 2, 512)
  v = jnp.cos(3 * x)
  s = compressor(bits)(smooth)
  with no_warning():
    assert float(jax.grad(jax.grad(compressor(bits)(lambda t: jnp.cos(jnp.sin(t)))))(3.0)) == pytest.approx(
        float(jax.grad(jax.grad(lambda t: jnp.cos(jnp.sin(t))))(3.0)), rel=1e-6)
    assert_exact(jax.hessian(s)(x[:48]), jax.hessian(smooth)(x[:48]))
    assert_exact(jax.jit(jax.hessian(s))(x[:48]), jax.hessian(smooth)(x[:48]))
    hvp = lambda f, x: jax.grad(lambda x: jnp.vdot(jax.grad(f)(x), v))(x)
    assert_exact(hvp(s, x), hvp(smooth, x))
    penalty = lambda f: jax.grad(lambda x: f(x) + jnp.sum(jax.grad(f)(x) ** 2))(x)
    assert_close(penalty(s), penalty(smooth), bits)


# --- forward mode and second order through another transform ------------------------------------

def rows(x):
  return jnp.tanh(x) * jnp.sin(x)


# Each applies `f` (elementwise) to x of shape (N, D) through a transform that traces it first.
THROUGH = {
    "jit": lambda f, x: jax.jit(f)(x),
    "vmap": lambda f, x: jax.vmap(f)(x),
    "scan": lambda f, x: lax.scan(lambda c, xi: (c, f(xi)), 0.0, x)[1],
    "cond": lambda f, x: lax.cond(jnp.sum(x) > -1e9, f, jnp.cos, x),
    "checkpoint": lambda f, x: jax.checkpoint(f)(x),
}

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("route", THROUGH)
def test_forward_mode_through_another_transform(route, bits):
  """jvp with jit, vmap, scan, cond or checkpoint in between: the tangent is a primitive whose
  evaluation is the exact JVP, wherever JAX meets it."""
  x, _, v = data()
  through = THROUGH[route]
  jvp = lambda f: jax.jvp(lambda x: through(f, x), (x,), (v,))
  assert_exact(jvp(compressor(bits)(rows)), jvp(rows))


@pytest.mark.parametrize("bits", BITS)
def test_linearize_and_higher_forward_orders_are_exact(bits):
  """jax.linearize (its linear function applied and transposed), forward over forward
  (jacfwd of jacfwd) and reverse over forward (grad of a jvp), under jit too."""
  x, _, v = data()
  small = x[0, :48]
  g = compressor(bits)(rows)
  for jit in (False, True):
    maybe_jit = jax.jit if jit else (lambda f: f)
    out, linear = jax.linearize(maybe_jit(g), x)
    want_out, want_linear = jax.linearize(rows, x)
    assert_exact(out, want_out)
    assert_exact(linear(v), want_linear(v))
    assert_close(jax.linear_transpose(linear, x)(v), jax.linear_transpose(want_linear, x)(v), bits)
    s = compressor(bits)(smooth)
    assert_exact(maybe_jit(jax.jacfwd(jax.jacfwd(s)))(small), jax.jacfwd(jax.jacfwd(smooth))(small))
    grad_of_jvp = lambda f: maybe_jit(jax.grad(lambda x: jnp.sum(jax.jvp(f, (x,), (v,))[1] ** 2)))(x)
    assert_exact(grad_of_jvp(g), grad_of_jvp(rows))


# Each 8-bit case compiles a differentiated codec (2-4 s): cond and checkpoint, which JAX handles
# as it handles jit, are left out to keep the file fast.
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("route", ["jit", "vmap", "scan"])
def test_second_order_through_another_transform(route, bits):
  """A Hessian-vector product is exact and a gradient penalty within the codec's noise, with jit,
  vmap or scan between the compressed call and the differentiation."""
  x, _, v = data()
  x, v = x[:8], v[:8]  # 512 elements: two groups at 8 bits (a smaller codec compiles faster)
  through = THROUGH[route]
  inner = lambda f: lambda x: jnp.sum(through(f, x))
  # (under an outer jit, to compile once: the transform in between is what matters)
  hvp = lambda f: jax.jit(jax.grad(lambda x: jnp.vdot(jax.grad(inner(f))(x), v)))(x)
  penalty = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(jax.grad(inner(f))(x) ** 2)))(x)
  with no_warning():
    assert_exact(hvp(compressor(bits)(rows)), hvp(rows))
    assert_close(penalty(compressor(bits)(rows)), penalty(rows), bits)


def test_second_order_noise_is_unbiased():
  """A gradient penalty at 8 bits through jit: its error is the first-order gradient's rounding
  noise times an exact derivative, so it averages out over rounding seeds like 1/sqrt(K): the mean
  of K = 16 seeds' penalties is 4x closer than one (0.4 allows for the estimate's own spread;
  a bias would keep the ratio near 1)."""
  x = data()[0][:8]
  g = jact.remat_compress(rows, bits=8, min_size=0)
  penalty_of = lambda f: lambda x: jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(jax.jit(f)(x)))(x) ** 2))(x)
  penalty = jax.jit(lambda x, key: penalty_of(functools.partial(g, rng=key))(x))
  exact = penalty_of(rows)(x)
  errors = [penalty(x, jax.random.key(k)) - exact for k in range(16)]
  single = np.sqrt(np.mean([float(jnp.sum(e ** 2)) for e in errors]))
  averaged = float(jnp.sqrt(jnp.sum(jnp.mean(jnp.stack(errors), 0) ** 2)))
  assert single > 0 and averaged < 0.4 * single, (averaged, single)
