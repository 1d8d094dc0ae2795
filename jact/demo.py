"""`jact demo`: the whole story of jact on scikit-learn's digits, on a CPU, in a few minutes.

A Flax MLP whose hidden layers are `jact.compressed` blocks classifies the 8x8 digits. The demo
prints what the backward pass keeps (`jact.residuals`), the widths `jact.calibrate` chooses for
an average of 2 bits, then trains the same initial variables on the same batches without
compression, with `jax.checkpoint` (`nn.remat`), at 8, 4 and 2 bits and with the calibrated
policy, and compares what the forward pass stores, what the compiled training step needs
(`jact.memory.compiled`, at a larger batch from abstract shapes), how long a step takes relative
to the baseline (measured interleaved, in this process) and the test accuracy reached. A plot
of the loss curves and the memory is saved at a path it prints.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from tqdm.auto import tqdm

import jact
from jact.info import format_bytes
from jact.models import common, registry, tasks, training

WIDTH, DEPTH, BATCH, CALIBRATED_BITS = 512, 6, 128, 2.0


class DenseBlock(nn.Module):
  """A hidden layer: dense, then GELU."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.gelu(nn.Dense(self.features)(x))


class MLP(nn.Module):
  """Flattens the input and applies `num_layers` `DenseBlock`s (named `layer_{i}`) and a head.

  Attributes:
    hidden_features: width of the hidden layers.
    num_layers: hidden layers.
    num_classes: size of the output logits.
    train: unused (no dropout or BatchNorm); the zoo's evaluation clones with `train=False`.
    wrap_block: class transform applied to `DenseBlock`, e.g. `jact.compressed`.
  """

  hidden_features: int
  num_layers: int
  num_classes: int = 10
  train: bool = True
  wrap_block: common.BlockWrapper | None = None

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.reshape(images.shape[0], -1)
    block = common.wrap(DenseBlock, self.wrap_block)
    for i in range(self.num_layers):
      x = block(self.hidden_features, name=f"layer_{i}")(x)
    return nn.Dense(self.num_classes, name="head")(x)


def mlp_task(steps: int, width: int = WIDTH, depth: int = DEPTH, batch_size: int = BATCH) -> tasks.Task:
  """The digits task (`tasks.digits_task`'s data and sampling) with the demo's MLP."""
  digits = tasks.digits_task(steps=steps, batch_size=batch_size, learning_rate=1e-3)

  def build(wrap_block):
    module = MLP(width, depth, wrap_block=wrap_block)
    return registry.ModelSpec("mlp", "demo", module, digits.sample, registry.classification_loss)

  return digits.replace(build=build, description=f"{depth}-hidden-layer GELU MLP (width {width}) "
                        "on scikit-learn's 8x8 digits")


@dataclasses.dataclass
class Result:
  """One variant: its memory, speed, accuracy and loss curve."""
  name: str
  wrap_block: Any
  residual_bytes: int = 0
  temp_bytes: int = 0
  step_seconds: float = 0.0
  accuracy: float = 0.0
  losses: np.ndarray | None = None


def variants(policy: jact.policies.Calibrated) -> list[Result]:
  return [Result("baseline", None), Result("jax.checkpoint", nn.remat),
          Result("jact 8 bits", training.compressed_blocks(8)),
          Result("jact 4 bits", training.compressed_blocks(4)),
          Result("jact 2 bits", training.compressed_blocks(2)),
          Result(f"jact calibrated, avg {CALIBRATED_BITS:g}", training.compressed_blocks(policy))]


def run(task: tasks.Task, memory_batch: int = 4096, seed: int = 0, timing_rounds: int = 5,
        verbose: bool = True) -> tuple[list[Result], jact.policies.Calibrated]:
  """Calibrates, trains and measures every variant; returns the results and the calibrated policy."""
  say = print if verbose else lambda *args, **kwargs: None
  params, state = training.init(task, seed)
  say(f"\nResiduals of the loss at batch {memory_batch}, every hidden layer jact.compressed at 2 bits "
      "(jact.residuals):\n")
  say(training.residual_table(task, training.compressed_blocks(2), memory_batch))
  policy = training.calibrate(task, params, state, seed, CALIBRATED_BITS, progress=True)
  say(f"\nWidths for an average of {CALIBRATED_BITS:g} bits, from each residual's effect on the gradient "
      "(jact.calibrate on the first batch):\n")
  say(policy)
  results = variants(policy)
  score = training.evaluator(task)
  trainers = []
  for result in results:
    trainer = training.Trainer(task, result.wrap_block)
    with tqdm(total=task.steps, desc=f"train {result.name}", leave=False, disable=None) as bar:
      trained = trainer.train(params, state, seed, progress=bar)
    result.losses, result.accuracy = trained.losses, score(trained.params, trained.state)
    trainers.append((trainer, trained))
  for result in tqdm(results, desc=f"compiled memory at batch {memory_batch}", leave=False, disable=None):
    result.residual_bytes = training.residual_table(task, result.wrap_block, memory_batch).activation_nbytes(stored=True)
    result.temp_bytes = training.step_memory(task, result.wrap_block, memory_batch).temp
  calls = [_step_call(trainer, trained, seed) for trainer, trained in trainers]
  with tqdm(total=timing_rounds, desc="step time (interleaved)", leave=False, disable=None) as bar:
    times = training.time_interleaved(calls, rounds=timing_rounds, progress=bar)
  for result, seconds in zip(results, times):
    result.step_seconds = seconds
  return results, policy


def _step_call(trainer: training.Trainer, trained: training.Trained, seed: int):
  """A training step of `trainer` from its final variables, on the run's first batch."""
  opt_state = trainer.tx.init(trained.params)
  batch = trainer.batch(seed, 0)
  return lambda: trainer.step(trained.params, trained.state, opt_state, *batch)


def table(results: list[Result], memory_batch: int) -> str:
  """The comparison as a markdown table, ratios relative to the first (baseline) row."""
  base = results[0]
  header = ("variant", f"residual bytes @{memory_batch}", f"compiled temp @{memory_batch}",
            "step time vs baseline", "test accuracy")
  less = lambda value, reference: "" if value == reference else f" ({reference / value:.1f}x less)"
  rows = [(r.name, format_bytes(r.residual_bytes) + less(r.residual_bytes, base.residual_bytes),
           format_bytes(r.temp_bytes) + less(r.temp_bytes, base.temp_bytes),
           f"{r.step_seconds / base.step_seconds:.2f}x", f"{100 * r.accuracy:.1f}%") for r in results]
  return training.markdown_table(header, rows)


def plot(results: list[Result], memory_batch: int, path: pathlib.Path) -> pathlib.Path:
  """Saves loss curves and memory bars of every variant as a PNG at `path`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (losses, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
  for result in results:
    losses.plot(training.smooth(result.losses, 20), label=result.name, lw=1)
  losses.set(title="training loss (moving average of 20 steps)", xlabel="step", yscale="log")
  losses.legend()
  position = np.arange(len(results))
  mib = lambda values: [v / 2**20 for v in values]
  memory.bar(position - 0.2, mib(r.temp_bytes for r in results), 0.4, label="compiled temp")
  memory.bar(position + 0.2, mib(r.residual_bytes for r in results), 0.4, label="residual bytes")
  memory.set(title=f"memory of a training step at batch {memory_batch}", ylabel="MiB",
             xticks=position)
  memory.set_xticklabels([r.name for r in results], rotation=20, ha="right")
  memory.legend()
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(steps: int = 400, memory_batch: int = 4096,
         plot_path: pathlib.Path = pathlib.Path("results/jact-demo.png")) -> list[Result]:
  task = mlp_task(steps)
  print(f"jact demo: a {task.description}, {steps} AdamW steps of batch {task.batch_size} per variant, "
        f"on {jax.default_backend()}.")
  results, _ = run(task, memory_batch=memory_batch)
  print()
  print(table(results, memory_batch))
  print("\nresidual bytes: what the forward pass hands to the backward pass, excluding parameters; "
        "compiled temp: XLA's scratch memory of the whole training step (forward, backward, AdamW); "
        "step time at the training batch.")
  print(f"plot: {plot(results, memory_batch, plot_path)}")
  return results
