"""`jact demo`: train an MLP on scikit-learn's digits with and without compressed residuals.

Every variant trains the same model from the same initialisation on the same batches; the table
compares what the forward pass stores for the backward pass, what the compiled training step
needs, how long a step takes relative to the baseline (measured interleaved, in this process)
and the test accuracy reached.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jact
from jact.info import format_bytes


DEPTH = 6


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  wrap: Callable[[Callable], Callable]  # applied to each hidden layer


def variants() -> list[Variant]:
  compress = lambda bits: (lambda f: jact.remat_compress(f, bits=bits, keep_argnums=(1, 2)))
  return [Variant("baseline", lambda f: f), Variant("jax.checkpoint", jax.checkpoint),
          Variant("jact 8 bits", compress(8)), Variant("jact 4 bits", compress(4)),
          Variant("jact 2 bits", compress(2))]


def load_digits(seed: int = 0):
  """scikit-learn's bundled 8x8 digits (1797 images, no download), split 80/20, standardised."""
  from sklearn.datasets import load_digits as sklearn_digits
  data = sklearn_digits()
  order = np.random.default_rng(seed).permutation(len(data.target))
  x, y = data.data[order].astype(np.float32), data.target[order].astype(np.int32)
  split = int(0.8 * len(y))
  mean, std = x[:split].mean(0), x[:split].std(0) + 1e-3
  x = (x - mean) / std
  return (x[:split], y[:split]), (x[split:], y[split:])


def hidden_layer(x, w, b):
  return jax.nn.gelu(x @ w + b)


def init_mlp(key, sizes):
  params = []
  for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    params.append((jax.random.normal(k, (m, n)) * (2 / m) ** 0.5, jnp.zeros(n)))
  return params


def make_step(layer: Callable, optimizer: optax.GradientTransformation):
  def loss_fn(params, x, y):
    for w, b in params[:-1]:
      x = layer(x, w, b)
    w, b = params[-1]
    return optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y).mean()

  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return loss_fn, step


def accuracy(params, x, y) -> float:
  for w, b in params[:-1]:
    x = hidden_layer(x, w, b)
  w, b = params[-1]
  return float(jnp.mean(jnp.argmax(x @ w + b, -1) == y))


@dataclasses.dataclass
class Result:
  name: str
  residual_bytes: int = 0
  temp_bytes: int = 0
  step_seconds: float = 0.0
  accuracy: float = 0.0
  losses: list = dataclasses.field(default_factory=list)


def run(steps: int = 400, batch: int = 256, width: int = 512, depth: int = DEPTH, memory_batch: int = 4096,
        seed: int = 0, timing_rounds: int = 5) -> list[Result]:
  """Trains every variant and measures it; returns one Result per variant."""
  (x_train, y_train), (x_test, y_test) = load_digits(seed)
  sizes = [x_train.shape[1]] + [width] * depth + [10]
  optimizer = optax.adam(1e-3)
  init = init_mlp(jax.random.key(seed), sizes)
  order = np.random.default_rng(seed).integers(0, len(y_train), size=(steps, batch))
  results, steps_fns, states = [], [], []
  for variant in variants():
    loss_fn, step = make_step(variant.wrap(hidden_layer), optimizer)
    result = Result(variant.name)
    big_x = jax.ShapeDtypeStruct((memory_batch, sizes[0]), jnp.float32)
    big_y = jax.ShapeDtypeStruct((memory_batch,), jnp.int32)
    result.residual_bytes = jact.residuals(loss_fn, init, big_x, big_y, keep_argnums=(0,)).activation_nbytes(stored=True)
    result.temp_bytes = jact.memory.compiled(step, init, optimizer.init(init), big_x, big_y).temp
    step = jax.jit(step)
    params, opt_state = init, optimizer.init(init)
    for i in tqdm(range(steps), desc=f"{variant.name:>15}", leave=False, disable=None):
      params, opt_state, loss = step(params, opt_state, x_train[order[i]], y_train[order[i]])
      result.losses.append(float(loss))
    result.accuracy = accuracy(params, x_test, y_test)
    results.append(result)
    steps_fns.append(step)
    states.append((params, opt_state))
  _time_interleaved(results, steps_fns, states, x_train[order[0]], y_train[order[0]], timing_rounds)
  return results


def _time_interleaved(results, steps_fns, states, x, y, rounds: int, repeats: int = 10):
  """Median step time of each variant, measured in alternation so machine noise hits all alike."""
  samples = [[] for _ in results]
  for _ in tqdm(range(rounds), desc="timing", leave=False, disable=None):
    for k, (step, (params, opt_state)) in enumerate(zip(steps_fns, states)):
      start = time.perf_counter()
      for _ in range(repeats):
        params, opt_state, loss = step(params, opt_state, x, y)
      jax.block_until_ready(loss)
      samples[k].append((time.perf_counter() - start) / repeats)
  for result, times in zip(results, samples):
    result.step_seconds = float(np.median(times))


def table(results: list[Result], memory_batch: int) -> str:
  base = results[0]
  header = ("variant", f"residual bytes @{memory_batch}", f"compiled temp @{memory_batch}",
            "step time vs baseline", "test accuracy")
  less = lambda value, reference: "" if value == reference else f" ({reference / value:.1f}x less)"
  rows = [(r.name, format_bytes(r.residual_bytes) + less(r.residual_bytes, base.residual_bytes),
           format_bytes(r.temp_bytes) + less(r.temp_bytes, base.temp_bytes),
           f"{r.step_seconds / base.step_seconds:.2f}x", f"{100 * r.accuracy:.1f}%") for r in results]
  widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
  line = lambda row: "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |"
  return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def main(steps: int = 400, memory_batch: int = 4096) -> list[Result]:
  print(f"jact demo: a {DEPTH}-hidden-layer GELU MLP (width 512) on scikit-learn digits, {steps} Adam steps "
        f"of batch 256, on {jax.default_backend()}.")
  results = run(steps=steps, memory_batch=memory_batch)
  print(table(results, memory_batch))
  print("residual bytes: what the forward pass hands to the backward pass, excluding parameters; "
        "compiled temp: XLA's scratch memory of the whole training step (forward, backward, Adam).")
  return results
