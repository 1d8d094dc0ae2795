"""Data-parallel training of a jact-compressed transformer on one or many hosts.

Every process runs this same script. The batch is sharded over all devices of all processes (mesh
axis "data"), parameters and optimizer state are replicated, and each transformer block stores its
residuals at 2 bits (`jact.compressed`). Each process feeds only its own devices' share of the
batch. Process 0 prints the loss of every step and the per-device memory of the compiled step,
compressed and uncompressed.

One process on the local devices (nothing to set up):

  python examples/multihost.py
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/multihost.py   # 8 CPU devices

N hosts, one process each (host 0 is the coordinator, reachable from the others at ADDRESS:PORT):

  # on host i, for i = 0 .. N-1
  python examples/multihost.py --coordinator ADDRESS:PORT --num-processes N --process-id i

  # the same through the environment variables that jax.distributed.initialize reads
  JAX_COORDINATOR_ADDRESS=ADDRESS:PORT JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i python examples/multihost.py

On Slurm, Open MPI or a Cloud TPU pod, jax.distributed.initialize finds all three itself:

  srun --nodes=N --ntasks-per-node=1 python examples/multihost.py --auto

Two processes on this machine, to try it out (CPU collectives go through gloo):

  python examples/multihost.py --coordinator localhost:12355 --num-processes 2 --process-id 0 &
  python examples/multihost.py --coordinator localhost:12355 --num-processes 2 --process-id 1
"""

from __future__ import annotations

import argparse
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jact


class Block(nn.Module):
  """A pre-LayerNorm transformer block: self-attention, then a GELU MLP, each with a residual."""
  heads: int

  @nn.compact
  def __call__(self, x):
    x = x + nn.SelfAttention(num_heads=self.heads, deterministic=True)(nn.LayerNorm()(x))
    hidden = nn.gelu(nn.Dense(4 * x.shape[-1])(nn.LayerNorm()(x)))
    return x + nn.Dense(x.shape[-1])(hidden)


class Model(nn.Module):
  """`depth` blocks of class `block` (compressed or not: the variables are the same)."""
  block: type
  depth: int
  heads: int

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = self.block(heads=self.heads)(x)
    return x


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                      help="ADDRESS:PORT of process 0 (default: $JAX_COORDINATOR_ADDRESS; none: one process)")
  parser.add_argument("--num-processes", type=int, default=os.environ.get("JAX_NUM_PROCESSES"))
  parser.add_argument("--process-id", type=int, default=os.environ.get("JAX_PROCESS_ID"))
  parser.add_argument("--auto", action="store_true", help="let jax detect the cluster (Slurm, Open MPI, TPU)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--bits", type=int, default=2)
  parser.add_argument("--batch-per-device", type=int, default=8)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--depth", type=int, default=2)
  args = parser.parse_args()
  if not args.auto and args.coordinator and (args.num_processes is None or args.process_id is None):
    parser.error("--coordinator needs --num-processes and --process-id (or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
  return args


def initialize(args: argparse.Namespace) -> None:
  """Joins the other processes, or stays a single process when no coordinator is given."""
  if not (args.auto or args.coordinator):
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # collectives between CPU processes
  if args.auto:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def local_batch(step: int, args: argparse.Namespace) -> tuple[jax.Array, jax.Array]:
  """This process's share of the batch of `step`: inputs and their targets, `sin(x @ teacher)`."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(1), step), jax.process_index())
  x = jax.random.normal(key, (args.batch_per_device * jax.local_device_count(), args.length, args.width))
  teacher = jax.random.normal(jax.random.key(2), (args.width, args.width)) / args.width**0.5
  return x, jnp.sin(x @ teacher)


def main() -> None:
  args = parse_args()
  initialize(args)
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  models = {"compressed": Model(jact.compressed(Block, bits=args.bits), args.depth, args.heads),
            "baseline": Model(Block, args.depth, args.heads)}
  optimizer = optax.adam(1e-3)

  def train_step(model):
    def step(params, opt_state, x, y):
      loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss
    return jax.jit(step, in_shardings=(replicated, replicated, batch_sharding, batch_sharding),
                   out_shardings=replicated, donate_argnums=(0, 1))

  def global_batch(step):
    return [jax.make_array_from_process_local_data(batch_sharding, part) for part in local_batch(step, args)]

  x, y = global_batch(0)
  params = jax.jit(models["baseline"].init, out_shardings=replicated)(jax.random.key(0), x)
  opt_state = jax.jit(optimizer.init, out_shardings=replicated)(params)
  steps = {name: train_step(model).lower(params, opt_state, x, y).compile() for name, model in models.items()}
  say = print if jax.process_index() == 0 else (lambda *_: None)
  say(f"{jax.process_count()} process(es), {jax.device_count()} devices, global batch "
      f"{x.shape[0]} x {args.length} tokens, {args.bits}-bit residuals")
  temp = {name: step.memory_analysis().temp_size_in_bytes for name, step in steps.items()}
  say(f"compiled temp per device: compressed {temp['compressed'] / 2**20:.1f} MiB, baseline "
      f"{temp['baseline'] / 2**20:.1f} MiB ({temp['compressed'] / temp['baseline']:.2f}x)")
  for step in range(args.steps):
    params, opt_state, loss = steps["compressed"](params, opt_state, *global_batch(step))
    say(f"step {step}: loss {float(loss):.4f}")
  stats = jax.local_devices()[0].memory_stats()  # None on CPU
  if stats:
    say(f"peak device memory: {stats['peak_bytes_in_use'] / 2**20:.1f} MiB")


if __name__ == "__main__":
  main()
