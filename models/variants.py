"""What the memory, max-batch and GPU benchmarks compare: one model, many ways to keep residuals.

Shared by benchmarks/memory.py, benchmarks/max_batch.py, benchmarks/gpu/steps.py and
benchmarks/investigations/where_memory_goes.py, as `from jact.models import variants as V`.

A variant is a class transform for the model zoo's `wrap_block` hook (`jact.models.get_model`):
the baseline keeps everything, `jax.checkpoint` (`nn.remat`) keeps each block's inputs and
recomputes the block, jact stores each residual compressed, and jact with `recompute=True` stores
only each block's inputs, compressed, and recomputes the block with its residuals compressed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import optax

import jact

from .registry import get_model


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  wrap_block: Callable | None  # None: the baseline
  bits: Any = None  # the width or policy, for residual accounting

  @property
  def is_jact(self) -> bool:
    return self.bits is not None


def jact_variant(bits: Any, recompute: bool = False, label: str | None = None, kernel: str = "auto") -> Variant:
  """Every block `jact.compressed` at `bits`; `kernel` as in `jact.quantize` ("auto": the fused
  kernels where the step is lowered for a GPU)."""
  name = label or f"jact {bits} bits" + (" + recompute" if recompute else "") + ("" if kernel == "auto" else f", {kernel}")
  return Variant(name, lambda cls: jact.compressed(cls, bits=bits, recompute=recompute, kernel=kernel), bits)


BASELINE = Variant("baseline", None)
CHECKPOINT = Variant("jax.checkpoint", nn.remat)
DEFAULT_VARIANTS = (BASELINE, CHECKPOINT, jact_variant(8), jact_variant(4), jact_variant(2),
                    jact_variant(2, recompute=True))
VARIANTS_BY_KEY = {"baseline": BASELINE, "checkpoint": CHECKPOINT, "8": jact_variant(8),
                   "4": jact_variant(4), "2": jact_variant(2), "2r": jact_variant(2, recompute=True),
                   "1": jact_variant(1), "1r": jact_variant(1, recompute=True),
                   "2x": jact_variant(2, kernel="xla"), "2rx": jact_variant(2, recompute=True, kernel="xla")}

# The GACT paper's configurations: (zoo name, batch for the memory table).
PAPER_MODELS = {"resnet18": 64, "resnet50": 64, "swin_t": 64, "vit_b16": 64, "bert_base": 32, "bert_large": 32,
                "gpt2_small": 16, "gcn": 1,
                "sage": 1, "gat": 1}


def spec_for(model: str, variant: Variant, size: str = "paper", **overrides):
  return get_model(model, size, wrap_block=variant.wrap_block, **overrides)


def gradient_step(spec) -> Callable:
  """(params, state, batch, rng) -> ((loss, state), grads): what compression changes."""
  def step(params, state, batch, rng):
    return jax.value_and_grad(spec.loss, has_aux=True)(params, state, batch, rng)
  return step


def train_step(spec, optimizer: optax.GradientTransformation | None = None) -> tuple[Callable, Any]:
  """A jitted Adam step donating params, state and optimizer state, and the optimizer."""
  optimizer = optimizer or optax.adam(1e-4)
  return jax.jit(spec.train_step(optimizer), donate_argnums=(0, 1, 2)), optimizer


def abstract_train_inputs(spec, batch_size: int, optimizer: optax.GradientTransformation):
  """ShapeDtypeStructs of (params, state, opt_state, batch, rng): nothing is allocated."""
  params, state = spec.abstract_init(batch_size)
  opt_state = jax.eval_shape(optimizer.init, params)
  return params, state, opt_state, spec.input_shapes(batch_size), rng_key()


def rng_key(seed: int = 0) -> jax.Array:
  """Dropout keys: XLA's RngBitGenerator ("rbg"), as large-scale JAX training uses; the default
  threefry materialises uint32 counters of every dropout mask's size."""
  return jax.random.key(seed, impl="rbg")
