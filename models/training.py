"""Training a `models.tasks.Task` with and without compressed residuals, and measuring it.

What the accuracy benchmark, `jact demo` and the notebooks share: the loss and the step, a
training loop with a progress bar, evaluation, calibration on a probe batch, compiled memory on
abstract shapes, interleaved step timing, and GACT's stability check (the gradient variance that
quantisation adds, next to the variance that minibatch sampling already has).

Every variant of a task trains the same initial variables on the same batches with the same
dropout masks (all drawn from the run's seed and the step number), so the variants differ only
by how residuals are stored.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jact

from .common import BlockWrapper
from .datasets import correct_and_scored, masked_cross_entropy
from .registry import Batch, ModelSpec, Params, State
from .tasks import Task

ROUNDING_STREAM = "rounding"
"""The Flax RNG stream that `compressed_blocks(..., seeded=True)` draws its rounding noise from."""

Loss = Callable[..., tuple[jax.Array, State]]


def compressed_blocks(bits: jact.policies.BitsOrPolicy, *, seeded: bool = False) -> BlockWrapper:
  """A `wrap_block` that stores each block's residuals with `jact.compressed(block, bits)`.

  Args:
    bits: an int width or a policy (a calibrated one included).
    seeded: draw the stochastic rounding noise from the `ROUNDING_STREAM` RNG stream instead of
      jact's default (a hash of each residual's values, fresh whenever the values change), so that
      one batch can be differentiated under several independent roundings.

  Returns:
    A class transform for `get_model(..., wrap_block=...)`; variable paths and residual names are
    those of the unwrapped blocks.
  """
  def wrap(block_cls):
    lifted = jact.compressed(block_cls, bits=bits)
    if not seeded:
      return lifted

    class Seeded(lifted):
      @nn.nowrap  # Flax's method wrapper would add the module's name to residual names once more
      def __call__(self, *args):
        return super().__call__(*args, rng=self.make_rng(ROUNDING_STREAM))

    Seeded.__name__, Seeded.__qualname__ = lifted.__name__, lifted.__qualname__
    return Seeded
  return wrap


def loss_fn(task: Task, spec: ModelSpec) -> Loss:
  """`loss(params, state, batch, key, rounding_key=None) -> (loss, new_state)` in training mode.

  `key` drives dropout; `rounding_key` feeds the `ROUNDING_STREAM` of seeded compressed blocks.
  """
  def loss(params: Params, state: State, batch: Batch, key: jax.Array,
           rounding_key: jax.Array | None = None) -> tuple[jax.Array, State]:
    rngs = {"dropout": key} if rounding_key is None else {"dropout": key, ROUNDING_STREAM: rounding_key}
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    logits, new_state = spec.module.apply({"params": params, **state}, **inputs, rngs=rngs,
                                          mutable=list(state))
    return masked_cross_entropy(*task.targets(logits, batch)), new_state
  return loss


def optimizer(task: Task) -> optax.GradientTransformation:
  """AdamW with a linear warm-up (5% of the steps) and cosine decay to zero."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, task.learning_rate, max(1, task.steps // 20),
                                                task.steps)
  return optax.adamw(schedule, weight_decay=1e-4)


def train_step(task: Task, spec: ModelSpec, tx: optax.GradientTransformation) -> Callable:
  """`step(params, state, opt_state, batch, key, rounding_key=None, policy=None) -> (params, state, opt_state, loss, grads)`.

  `policy` (jit it as a static argument) overrides the bits of every compressed block
  (`jact.use_policy`; None: each block's own). The step also returns the gradient it applied, so
  that measurements (GACT's stability check) use the very function that trains.
  """
  loss = loss_fn(task, spec)
  def step(params, state, opt_state, batch, key, rounding_key=None, policy=None):
    with jact.use_policy(policy):
      (value, state), grads = jax.value_and_grad(loss, has_aux=True)(params, state, batch, key, rounding_key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, value, grads
  return step


def step_keys(seed: int, step: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(batch, dropout, rounding) keys of a training step: the same for every variant of a run."""
  return tuple(jax.random.split(jax.random.fold_in(jax.random.key(seed), step), 3))


def probe_batch(task: Task, seed: int) -> tuple[Batch, jax.Array]:
  """The first training batch of a run and its dropout key (what calibration probes)."""
  batch_key, key, _ = step_keys(seed, 0)
  return task.sample(batch_key, task.batch_size), key


def init(task: Task, seed: int) -> tuple[Params, State]:
  """The initial variables of a run (the same for every variant)."""
  batch, _ = probe_batch(task, seed)
  return jax.jit(task.build(None).init)(jax.random.key(seed), batch)


@dataclasses.dataclass
class Trained:
  """The end of a training run.

  Attributes:
    params, state: the final variables.
    losses: the training loss of every step.
    seconds: wall time of the loop, compilation included.
  """
  params: Params
  state: State
  losses: np.ndarray
  seconds: float


class Trainer:
  """One variant of a task: its blocks wrapped by `wrap_block`, the step compiled once.

  Args:
    task: what to train, for `task.steps` steps.
    wrap_block: the variant (None: plain; `nn.remat`; `compressed_blocks(bits)`).
  """

  def __init__(self, task: Task, wrap_block: BlockWrapper | None):
    self.task = task
    self.spec = task.build(wrap_block)
    self.tx = optimizer(task)
    self.step = jax.jit(train_step(task, self.spec, self.tx), static_argnames="policy")
    self.sample = jax.jit(task.sample, static_argnums=1)

  def batch(self, seed: int, step: int) -> tuple[Batch, jax.Array, jax.Array]:
    """The training batch, dropout key and rounding key of a step of the run `seed`."""
    batch_key, key, rounding_key = step_keys(seed, step)
    return self.sample(batch_key, self.task.batch_size), key, rounding_key

  def gradient(self, params: Params, state: State, batch: Batch, key: jax.Array,
               rounding_key: jax.Array | None = None, policy: Any = None) -> Params:
    """The gradient that a step from these variables applies (the update is discarded)."""
    return self.step(params, state, self.tx.init(params), batch, key, rounding_key, policy=policy)[-1]

  def train(self, params: Params, state: State, seed: int, *, progress: tqdm | None = None,
            checkpoint_every: int = 0, on_checkpoint: Callable[[int, Params, State], None] | None = None,
            policy_for: Callable[[int, Params, State, Batch, jax.Array], Any] | None = None) -> Trained:
    """Trains from the given variables.

    Args:
      params, state: initial variables (`init(task, seed)`).
      seed: draws the batches, dropout masks and rounding keys (`step_keys`).
      progress: a tqdm bar advanced once per step (None: no bar).
      checkpoint_every: call `on_checkpoint(step, params, state)` before every this many steps
        and after the last (0: never).
      on_checkpoint: what to do at a checkpoint (e.g. measure gradient noise).
      policy_for: `(step, params, state, batch, key) -> policy` for the compressed blocks at each
        step (e.g. a `jact.Recalibration`); each new policy compiles the step once.

    Returns:
      `Trained`.
    """
    opt_state = self.tx.init(params)
    losses = []
    start = time.perf_counter()
    for i in range(self.task.steps):
      if checkpoint_every and i % checkpoint_every == 0:
        on_checkpoint(i, params, state)
      batch, key, rounding_key = self.batch(seed, i)
      policy = None if policy_for is None else policy_for(i, params, state, batch, key)
      params, state, opt_state, loss, _ = self.step(params, state, opt_state, batch, key, rounding_key,
                                                    policy=policy)
      losses.append(loss)
      if progress is not None:
        progress.update()
    if checkpoint_every:
      on_checkpoint(self.task.steps, params, state)
    losses = np.asarray(jax.device_get(losses), np.float32)
    return Trained(params, state, losses, time.perf_counter() - start)


def evaluator(task: Task) -> Callable[[Params, State], float]:
  """`score(params, state)`: the task's metric on its test data, in evaluation mode (a fraction)."""
  spec = task.build(None)

  @jax.jit
  def counts(params, state):
    logits = spec.logits(params, state, {k: v for k, v in task.data.test.items() if k != "labels"})
    return correct_and_scored(*task.targets(logits, task.data.test))

  def score(params: Params, state: State) -> float:
    correct, scored = counts(params, state)
    return float(correct) / float(scored)
  return score


def calibrate(task: Task, params: Params, state: State, seed: int, avg_bits: float,
              progress: bool = False, **options: Any) -> jact.policies.Calibrated:
  """`jact.calibrate` on the run's first batch: per-residual widths averaging `avg_bits`.

  Args:
    task: the model whose compressed blocks are calibrated.
    params, state: the variables the sensitivities are measured at.
    seed: the run (its first batch is the probe batch).
    avg_bits: the average width of the budget.
    progress: show `jact.calibrate`'s progress bar.
    **options: passed to `jact.calibrate` (`method`, `num_probes`, `candidates`, ...).
  """
  batch, key = probe_batch(task, seed)
  return jact.calibrate(calibration_loss(task), params, state, batch, key, avg_bits=avg_bits,
                        has_aux=True, progress=progress, **options)


def calibration_loss(task: Task) -> Loss:
  """The loss with every block compressed, for `jact.calibrate` and `jact.Recalibration`.

  Calibration keeps residuals exact and looks them up by name; a compressed width (any below 32)
  lets it see which residuals are rebuilt from others (`ResidualInfo.rebuilt_from`) and price them
  with the residual they are rebuilt from.
  """
  return loss_fn(task, task.build(compressed_blocks(2)))


@dataclasses.dataclass(frozen=True)
class GradientNoise:
  """GACT's stability check at one point of training, in squared gradient norm.

  Attributes:
    quantisation: E ||g_q - g||^2 on one batch and dropout mask, over independent roundings of
      the compressed residuals (g_q), against the exact gradient of that batch (g).
    sampling: the variance of the exact gradient over independent batches (and dropout masks):
      the noise SGD has anyway.
  """
  quantisation: float
  sampling: float

  @property
  def ratio(self) -> float:
    """Quantisation over sampling variance: compression adds little noise when it is small."""
    return self.quantisation / self.sampling


class NoiseProbe:
  """Measures `GradientNoise` of compressed variants at given variables.

  Args:
    exact: the task's full-precision trainer (its gradients are the exact ones).
    num_roundings: roundings averaged for the quantisation variance.
    num_batches: batches for the sampling variance (at least 2).
  """

  def __init__(self, exact: Trainer, num_roundings: int = 4, num_batches: int = 4):
    if num_batches < 2:
      raise ValueError(f"num_batches={num_batches}: a variance needs at least 2 batches")
    self.exact, self.num_roundings, self.num_batches = exact, num_roundings, num_batches

  def __call__(self, quantised: Trainer, params: Params, state: State, key: jax.Array,
               policy: Any = None) -> GradientNoise:
    """The noise of `quantised` (built with `compressed_blocks(..., seeded=True)`) at these variables.

    `policy` overrides its blocks' bits, as in `train_step`.
    """
    keys = jax.random.split(key, self.num_batches + self.num_roundings)
    batches = []
    for k in keys[:self.num_batches]:
      batch_key, dropout_key = jax.random.split(k)
      batches.append((self.exact.sample(batch_key, self.exact.task.batch_size), dropout_key))
    grads = [self.exact.gradient(params, state, *batch) for batch in batches]
    mean = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
    sampling = sum(_squared_distance(g, mean) for g in grads) / (len(grads) - 1)
    quantisation = np.mean([_squared_distance(quantised.gradient(params, state, *batches[0], k, policy), grads[0])
                            for k in keys[self.num_batches:]])
    return GradientNoise(float(quantisation), float(sampling))


def _squared_distance(a, b) -> float:
  return float(sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def abstract_batch(task: Task, batch_size: int) -> Batch:
  """A training batch of `batch_size` as `jax.ShapeDtypeStruct`s (a graph: the whole graph)."""
  return jax.eval_shape(lambda key: task.sample(key, batch_size), jax.random.key(0))


def step_memory(task: Task, wrap_block: BlockWrapper | None, batch_size: int) -> jact.memory.CompiledMemory:
  """Compiled memory of a training step at `batch_size`, from abstract shapes (nothing runs)."""
  spec = task.build(wrap_block)
  batch = abstract_batch(task, batch_size)
  params, state = jax.eval_shape(spec.init, jax.random.key(0), batch)
  tx = optimizer(task)
  return jact.memory.compiled(train_step(task, spec, tx), params, state, jax.eval_shape(tx.init, params),
                              batch, jax.eval_shape(jax.random.key, 0))


def residual_table(task: Task, wrap_block: BlockWrapper | None, batch_size: int) -> jact.ResidualTable:
  """`jact.residuals` of the training loss at `batch_size` (abstract shapes; parameters kept)."""
  spec = task.build(wrap_block)
  batch = abstract_batch(task, batch_size)
  params, state = jax.eval_shape(spec.init, jax.random.key(0), batch)
  return jact.residuals(loss_fn(task, spec), params, state, batch, jax.eval_shape(jax.random.key, 0),
                        keep_argnums=(0, 1))


def time_interleaved(calls: Sequence[Callable[[], Any]], rounds: int = 5, repeats: int = 10,
                     progress: tqdm | None = None) -> list[float]:
  """Median seconds per call of each function, measured in alternation in this process.

  Alternating the functions round by round exposes them all to the same machine noise (other
  processes, frequency changes), so their ratios are fair where absolute times are not.

  Args:
    calls: functions without arguments that return something `jax.block_until_ready` accepts;
      each is called once before timing (compilation).
    rounds: timed rounds; the median over rounds is reported.
    repeats: calls per function per round.
    progress: a tqdm bar advanced once per round.
  """
  for call in calls:
    jax.block_until_ready(call())
  samples = [[] for _ in calls]
  for _ in range(rounds):
    for call, times in zip(calls, samples):
      start = time.perf_counter()
      for _ in range(repeats):
        out = call()
      jax.block_until_ready(out)
      times.append((time.perf_counter() - start) / repeats)
    if progress is not None:
      progress.update()
  return [float(np.median(times)) for times in samples]


def smooth(values: np.ndarray, window: int) -> np.ndarray:
  """Moving average of a loss curve over `window` steps (over fewer at the start)."""
  cumulative = np.cumsum(np.insert(np.asarray(values, np.float64), 0, 0.0))
  index = np.arange(1, len(values) + 1)
  return (cumulative[index] - cumulative[np.maximum(index - window, 0)]) / np.minimum(index, window)


def max_batch(peak_at: Callable[[int], int], budget: int, start: int = 1, resolution: float = 0.05,
              growth: float = 2.0) -> int:
  """The largest batch whose step fits `budget` bytes, by bracketing and bisection.

  Compiled memory grows with the batch, so stepping up (or down) by `growth` from `start`
  brackets the answer and bisection narrows it; each probe is one compilation on abstract shapes
  (nothing runs).

  Args:
    peak_at: batch size -> peak bytes of the step (e.g. `step_memory(...).peak`).
    budget: bytes available.
    start: first batch tried (a good guess saves compilations).
    resolution: stop when the bracket is narrower than this fraction of the batch.
    growth: factor between bracketing probes; close to 1 when `start` is a close guess.

  Returns:
    The largest batch found to fit (0 when not even a batch of 1 fits).
  """
  fits = lambda batch: peak_at(batch) <= budget
  grow = lambda batch: max(batch + 1, int(batch * growth))
  shrink = lambda batch: max(1, int(batch / growth))
  low, high = (start, grow(start)) if fits(start) else (0, start)
  while low and fits(high):
    low, high = high, grow(high)
  while not low and high > 1:
    low, high = (shrink(high), high) if fits(shrink(high)) else (0, shrink(high))
  while low and high - low > max(1, int(low * resolution)):
    middle = (low + high) // 2
    low, high = (middle, high) if fits(middle) else (low, middle)
  return low


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """Rows of strings as an aligned markdown table."""
  widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
  line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
  return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
