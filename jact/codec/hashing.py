"""Counter-based noise for stochastic rounding.

The uniform noise of stochastic rounding is a hash of (seed, element index, element bits) rather
than the output of a stateful PRNG, so that

* it needs no noise buffer: each element's noise is computed where it is used, by XLA or inside a
  Pallas kernel (the functions below use only uint32 multiply, xor and shift, which both lower);
* it is reproducible: the same seed and input give bitwise identical codes;
* it is fresh on every training step without plumbing a key: the element's own bits enter the
  hash, so new activations get new noise, and examples of a `vmap` get independent noise;
* XLA cannot constant-fold it: noise that depends on indices alone is a compile-time constant,
  and folding it for every residual of a large network takes minutes of compile time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B9)  # 2**32 / golden ratio: spreads consecutive indices
_MIX1 = np.uint32(0x85EBCA6B)  # MurmurHash3 fmix32 constants
_MIX2 = np.uint32(0xC2B2AE35)
_SEED_SALT = np.uint32(0x2545F491)


def fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection on uint32 with full avalanche."""
  h = h ^ (h >> 16)
  h = h * _MIX1
  h = h ^ (h >> 13)
  h = h * _MIX2
  return h ^ (h >> 16)


def seed_key(seed) -> jax.Array:
  """Scrambles a user seed (int or uint32 scalar, possibly traced) into a uint32 key."""
  return fmix32(jnp.asarray(seed).astype(jnp.uint32) ^ _SEED_SALT)


def value_bits(x: jax.Array) -> jax.Array:
  """The bit pattern of each element of a float array, folded into uint32."""
  width = jnp.dtype(x.dtype).itemsize * 8
  bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{width}"))
  if width == 64:
    return (bits ^ (bits >> 32)).astype(jnp.uint32)
  return bits.astype(jnp.uint32)


def uniform(key: jax.Array, index: jax.Array, bits: jax.Array, dtype) -> jax.Array:
  """Uniform noise in [0, 1) with 24 random bits, from a key, element indices and element bits.

  The element's bits enter first: a first round on (index, key) alone would not depend on the
  activations, and XLA would compute it for every residual at the start of the step and keep a
  uint32 per element alive until each residual is quantised.
  """
  h = fmix32(bits ^ key)
  h = fmix32(h ^ index.astype(jnp.uint32) * _GOLDEN)
  return (h >> 8).astype(dtype) * dtype(2.0**-24)
