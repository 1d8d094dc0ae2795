"""Memory is real: compiled temp bytes of a 16-layer MLP fall, not just the sum of residual bytes."""

import functools
import math
import re

import jax
import jax.numpy as jnp

import jact
from jact.models.mlp import BATCH, DEPTH, WIDTH, abstract_inputs, layer, lowered, mlp_loss, wrapped


@functools.lru_cache()
def compiled_temp(bits):
  return jact.memory.compiled(jax.grad(mlp_loss(wrapped(bits))), *abstract_inputs()).temp


def test_residual_bytes_fall_at_least_12x_at_2_bits():
  ws, x = abstract_inputs()
  base = jact.residuals(mlp_loss(layer), ws, x, keep_argnums=(0,)).activation_nbytes()
  stored = jact.residuals(mlp_loss(wrapped(2)), ws, x, keep_argnums=(0,)).activation_nbytes(stored=True)
  assert base / stored >= 12, (base, stored)


def test_compiled_temp_falls_with_the_residuals():
  base = compiled_temp(None)
  assert compiled_temp(2) <= 0.30 * base, (compiled_temp(2), base)
  assert compiled_temp(8) <= 0.45 * base, (compiled_temp(8), base)


def test_memory_compiled_reports_all_fields():
  m = jact.memory.compiled(jax.grad(mlp_loss(layer)), *abstract_inputs())
  assert m.argument == (DEPTH * WIDTH * WIDTH + BATCH * WIDTH) * 4
  assert DEPTH * WIDTH * WIDTH * 4 <= m.output < DEPTH * WIDTH * WIDTH * 4 + 4096  # weight gradients
  assert m.peak == m.argument + m.output - m.alias + m.temp and "temp" in str(m)


def compiled_hlo(bits, depth=DEPTH) -> str:
  return lowered(bits, depth).compile().as_text()


def test_codec_work_is_not_constant_folded():
  """Noise hashed from indices alone, or a residual that is a compile-time constant, would let
  XLA fold the codec into huge literals at compile time (minutes for a ResNet-50). The optimised
  step holds no constant larger than the codec's shift tables."""
  sizes = [math.prod(int(d) for d in dims.split(",") if d) for dims in
           re.findall(r"= \w+\[([\d,]*)\]\{?[\d,]*\}? constant\(", compiled_hlo(2))]
  assert sizes and max(sizes) <= 8, sizes


def lowered_ops(bits, depth) -> int:
  """Operations in the StableHLO module that XLA receives for the gradient step."""
  return len(re.findall(r"= \"?[a-z_]+\.[a-z_]+", lowered(bits, depth).as_text()))


def test_layers_share_compiled_code():
  """Compile time: identical compressed layers are one shared function (marked for late inlining,
  which XLA:CPU keeps as one called computation), so the module XLA optimises grows by less per
  layer than the uncompressed step's does. (XLA compile seconds, this machine: 0.37 s against
  0.10-0.16 s uncompressed for 16 layers, 0.75 s before sharing; ResNet-50 14 s against 7 s. See
  the README's Limits.)"""
  growth = lambda bits: lowered_ops(bits, DEPTH) - lowered_ops(bits, DEPTH // 2)
  assert jax.device_count() == 1
  assert growth(2) <= growth(None), (growth(2), growth(None))


def test_late_inlining_can_be_turned_off(monkeypatch):
  """JACT_LATE_INLINING=0 (jact._compile.LATE_INLINING) gives XLA plain, early-inlined calls."""
  from jact import _compile
  marked = lambda: lowered(2, depth=2).as_text().count("xla_late")
  assert marked() > 0
  monkeypatch.setattr(_compile, "LATE_INLINING", False)
  assert marked() == 0


def test_constant_loop_carry_costs_no_more_than_a_computed_one():
  """A scan accumulating into `jnp.zeros` (message passing, chunked sums): XLA would build the zeros
  at the start of the forward or backward pass and keep them until the loop runs; jact makes them
  wait for the loop's other inputs, so they cost what a carry computed from the data costs."""
  n, d, depth, chunks = 4096, 256, 6, 8

  def layer(x, w, zero_init):
    h = x @ w
    index = jnp.arange(n).reshape(chunks, n // chunks)
    init = jnp.zeros((n, d)) if zero_init else h * 0.0  # the second is a runtime value
    total, _ = jax.lax.scan(lambda total, rows: (total.at[rows].add(h[rows]), None), init, index)
    total = total - total.mean(axis=0)
    return jax.nn.gelu(total * jax.lax.rsqrt(jnp.mean(total**2, axis=0) + 1e-5))

  def temp(zero_init):
    f = jact.remat_compress(functools.partial(layer, zero_init=zero_init), bits=2, keep_argnums=(1,))
    loss = lambda ws, x: jnp.sum(functools.reduce(lambda h, w: f(h, w), ws, x) ** 2)
    ws = [jax.ShapeDtypeStruct((d, d), jnp.float32)] * depth
    return jact.memory.compiled(jax.grad(loss), ws, jax.ShapeDtypeStruct((n, d), jnp.float32)).temp

  carry_bytes = n * d * 4
  assert temp(True) <= temp(False) + carry_bytes / 4, (temp(True) / carry_bytes, temp(False) / carry_bytes)


def test_backward_pass_restores_one_layer_at_a_time():
  """Each layer's backward pass (ReLU of a convolution) holds its cotangent with its decoded
  input for the weight gradient, then the cotangent with the input's cotangent: two full-size
  buffers beyond what is stored. Restoring follows the backward jaxpr's order -- a residual is
  decoded only once the equation before its first use, the previous layer's weight gradient,
  is done -- so no layer's input is decoded ahead while another's is still alive. (A quarter
  buffer covers workspaces and per-group metadata.)"""
  def conv(x, k):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y)

  f = jact.remat_compress(conv, bits=2, keep_argnums=(1,))
  loss = lambda ks, x: jnp.mean(functools.reduce(lambda h, k: f(h, k), ks, x) ** 2)
  ks = [jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)] * 8
  x = jax.ShapeDtypeStruct((16, 56, 56, 64), jnp.float32)
  buffer = math.prod(x.shape) * 4
  stored = jact.residuals(loss, ks, x, keep_argnums=(0,)).activation_nbytes(stored=True)
  temp = jact.memory.compiled(jax.grad(loss), ks, x).temp
  assert temp <= stored + 2.25 * buffer, ((temp - stored) / buffer)


def test_alive_at_peak_reads_what_xla_keeps_alive(tmp_path):
  """jact.memory.alive_at_peak reads XLA's buffer assignment: at the product of sin(x) and cos(x)
  both operands are alive, and what is alive fits in the compiled scratch block. (Summed, XLA
  fuses the whole step into one kernel and needs no scratch block at all.)"""
  x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
  step = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x))
  compiled = step.lower(x).compile(compiler_options=jact.memory.dump_options(tmp_path))
  report = jact.memory.alive_at_peak(tmp_path)
  assert report.temp == compiled.memory_analysis().temp_size_in_bytes
  assert 2 * 256 * 256 * 4 <= report.alive <= report.temp
  assert report.alive == sum(buffer.size for buffer in report.buffers)


def test_at_peak_names_the_operations_that_made_each_buffer():
  """jact.memory.at_peak compiles a step with the dumps on and reads them: the buffers alive at
  the product carry the JAX name scopes of the operations that made them."""
  def step(x):
    with jax.named_scope("first"):
      a = jnp.sin(x)
    with jax.named_scope("second"):
      b = jnp.cos(x)
    return a @ b

  x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
  report = jact.memory.at_peak(step, x)
  assert report.temp == jact.memory.compiled(step, x).temp
  made_by = " ".join(report.made_by(buffer) for buffer in report.buffers)
  assert "first" in made_by and "second" in made_by, made_by
