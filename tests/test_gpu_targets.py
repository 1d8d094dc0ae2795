"""Compiled memory on XLA:GPU without a GPU: `jact.memory.compiled(..., target="h100")`.

Small steps are compiled for the H100 target (paper-size models belong in benchmarks/memory.py
--target h100). On a GPU, `kernel="auto"` runs the fused Pallas kernels: compiled for the target,
the step must contain them as Triton kernels and need no more memory than the jax.numpy codec.
"""

import functools
import importlib.util
import re

import jax
import jax.numpy as jnp
import optax
import pytest

import jact
from jact import targets
from jact.models import variants as V
from jact.models.mlp import layer, mlp_loss

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax_plugins.xla_cuda13") is None,
                                reason="needs the CUDA plugin of the dev extra (jax-cuda13-plugin)")


MLP_ARGS = ([jax.ShapeDtypeStruct((512, 512), jnp.float32)] * 6, jax.ShapeDtypeStruct((2048, 512), jnp.float32))


def test_named_targets_and_target_texts():
  step = jax.grad(mlp_loss(layer))
  h100 = jact.memory.compiled(step, *MLP_ARGS, target="h100")
  h200 = jact.memory.compiled(step, *MLP_ARGS, target="h200")
  text = jact.memory.compiled(step, *MLP_ARGS, target=targets.target_text("h100"))
  assert h100.temp > 0 and h100.argument == 6 * 512 * 512 * 4 + 2048 * 512 * 4
  assert text == h100  # the same description, given as text
  assert h200.temp > 0


def test_bad_targets_and_a_missing_plugin_say_what_to_do(monkeypatch):
  with pytest.raises(ValueError, match="h100"):
    jact.memory.compiled(jnp.sin, jnp.ones(3), target="tpu-v9")
  with pytest.raises(TypeError, match="target"):
    jact.memory.compiled(jnp.sin, jnp.ones(3), target=100)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  targets.mesh_for.cache_clear()
  try:
    with pytest.raises(ImportError, match=r"jax-act\[gpu-compile\]"):
      jact.memory.compiled(jnp.sin, jnp.ones(3), target="h100")
  finally:
    monkeypatch.undo()
    targets.mesh_for.cache_clear()


def compiled_text(fn, *args, target):
  return targets.compile_for(jax.jit(fn), target, *args).as_text()


def convolutions(x, kernels):
  for k in kernels:
    x = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.mean(x ** 2)


CONV_ARGS = (jax.ShapeDtypeStruct((16, 32, 32, 64), jnp.float32), [jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)] * 3)


def test_auto_runs_the_triton_kernels_where_the_step_is_lowered_for_a_gpu():
  """The choice follows the platform the step is lowered for, not the default backend (the CPU):
  a convolution's result, in memory anyway, is quantised by the kernel on the GPU; elementwise
  and matrix-product residuals go through the jax.numpy codec, which XLA fuses."""
  triton = lambda text: bool(re.search(r'custom_call_target="__gpu\$xla\.gpu\.triton"', text))
  for kernel, on_gpu in (("auto", True), ("pallas", True), ("xla", False)):
    step = jax.grad(jact.remat_compress(convolutions, bits=2, keep_argnums=(1,), kernel=kernel), argnums=(0, 1))
    assert triton(compiled_text(step, *CONV_ARGS, target="h100")) == on_gpu, kernel
    assert not triton(jax.jit(step).lower(*CONV_ARGS).compile().as_text())  # CPU: never Triton
  step = jax.grad(mlp_loss(jact.remat_compress(layer, bits=2, keep_argnums=(1,))))
  assert not triton(compiled_text(step, *MLP_ARGS, target="h100"))


def zoo_figures(name: str, batch: int, **overrides) -> dict[str, int]:
  """Compiled temp bytes of a zoo model's gradient step on the H100 target, per variant."""
  figures = {}
  variants = {"baseline": V.BASELINE, "checkpoint": V.CHECKPOINT, "xla": V.jact_variant(2, kernel="xla"),
              "auto": V.jact_variant(2)}
  for key, variant in variants.items():
    spec = V.spec_for(name, variant, size="tiny", **overrides)
    params, state = spec.abstract_init(batch)
    inputs = (params, state, spec.input_shapes(batch), V.rng_key())
    figures[key] = jact.memory.compiled(V.gradient_step(spec), *inputs, target="h100").temp
  return figures


@functools.lru_cache()
def resnet_figures():
  return zoo_figures("resnet18", 32, image_size=96, num_filters=16)


@functools.lru_cache()
def transformer_figures():
  return zoo_figures("bert_base", 16, seq_len=128, max_position=128, hidden_size=128, mlp_features=512, num_heads=4)


@pytest.mark.parametrize("figures", [resnet_figures, transformer_figures], ids=["conv-bn-relu", "transformer"])
def test_compressed_steps_need_less_on_the_gpu_compiler(figures):
  figures = figures()
  # Below the baseline and below the rival, jax.checkpoint, which keeps each block's input in
  # float32 and rebuilds its residuals in the backward pass. (Not a ratio: XLA:GPU itself stores
  # some residuals more compactly than jax does -- a ReLU's mask as a predicate -- so the bytes
  # jact removes from the residual table do not all come off the step.)
  assert figures["auto"] < figures["baseline"] and figures["auto"] < figures["checkpoint"], figures
  # The fused kernels never cost memory over the jax.numpy codec.
  assert figures["auto"] <= figures["xla"], figures
