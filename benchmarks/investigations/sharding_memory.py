"""Where a data-parallel device's memory goes, against one device at the same per-device batch.

  python benchmarks/investigations/sharding_memory.py            # the transformer of jact.models.sharded
  python benchmarks/investigations/sharding_memory.py --top 12

Compiles the training step of `jact.models.sharded` (the transformer of tests/sharding_checks.py,
on 8 simulated CPU devices) on one device at an eighth of the batch and data-parallel at the full
batch, uncompressed and compressed, with XLA's dumps, and prints for each the compiled temp bytes,
the most bytes alive at once and the buffers alive then (`jact.memory.at_peak`; see
benchmarks/investigations/where_memory_goes.py). Where the two are equal, XLA's packing is not what
differs between the steps: what is alive is.
"""

from __future__ import annotations

import os

# 8 CPU devices: XLA reads the flag when jax starts, so it is set before jax (or jact) is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jact.info import format_bytes  # noqa: E402
from jact.memory import at_peak  # noqa: E402
from jact.models import sharded as S  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--top", type=int, default=8, help="buffers to list per step")
  args = parser.parse_args()
  batch = jax.ShapeDtypeStruct((S.BATCH, S.MEMORY_LENGTH, S.WIDTH), jnp.float32)
  share = jax.ShapeDtypeStruct((S.BATCH // 8, S.MEMORY_LENGTH, S.WIDTH), jnp.float32)
  params = jax.eval_shape(S.BASELINE.init, jax.random.key(0), batch)
  opt_state = jax.eval_shape(S.OPTIMIZER.init, params)
  temps = {}
  for name, parallelism, x in (("one device, batch / 8", None, share), ("data parallel", "data", batch)):
    for variant, model in (("baseline", S.BASELINE), ("compressed", S.COMPRESSED)):
      with S.partitioned(parallelism):
        report = at_peak(S.jitted_train_step(model, parallelism, params, opt_state), params, opt_state, x, x)
      temps[name, variant] = report.temp
      print(f"{name}, {variant}: compiled temp {format_bytes(report.temp)}, most alive at once "
            f"{format_bytes(report.alive)} at {report.peak_instruction} "
            f"(step {report.peak_step} of {len(report.sequence)})")
      for buffer in report.buffers[:args.top]:
        print(f"  {format_bytes(buffer.size):>11}  {buffer.start:>5}-{buffer.end:<5}  {report.made_by(buffer)[-90:]}")
  ratio = lambda name: temps[name, "compressed"] / temps[name, "baseline"]
  one, data = ratio("one device, batch / 8"), ratio("data parallel")
  parity = temps["one device, batch / 8", "compressed"] / temps["data parallel", "baseline"]
  print(f"ratio: one device at batch / 8 {one:.3f}x, data parallel {data:.3f}x ({data / one:.2f}x); with the "
        f"compressed step at exactly the one-device share, data parallel would be {parity:.3f}x "
        f"({parity / one:.2f}x)")


if __name__ == "__main__":
  main()
