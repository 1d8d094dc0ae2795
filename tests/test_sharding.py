"""jact under SPMD sharding: data and tensor parallelism on 8 simulated CPU devices, and shard_map.

The measurements come from tests/sharding_checks.py, run in fresh processes (the device count is
an XLA flag read when jax starts): the compiled steps in one, gradients and shard_map in another,
side by side so that the two cores compile at once.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = Path(__file__).with_name("sharding_checks.py")
PARTS = (("compiled",), ("gradients", "shard_map"))
# Only the order of float32 additions differs: a weight gradient sums 2048 tokens, and summing
# n terms in another order moves the sum by about sqrt(n) * 2**-24 (3e-6) of their magnitude.
FLOAT32_RTOL = 1e-5


@pytest.fixture(scope="module")
def measured() -> dict:
  processes = [subprocess.Popen([sys.executable, str(CHECKS), *part], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for part in PARTS]
  out = {}
  for process in processes:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-4000:]
    out.update(json.loads(stdout))
  return out


@pytest.mark.parametrize("parallelism", ["data", "tensor"])
def test_compression_adds_no_collective(measured, parallelism):
  """Quantisation groups lie within one device's shard, so quantising needs no communication:
  the compressed step has exactly the baseline's all-reduces (gradients, row-parallel layers)."""
  compiled = measured["compiled"]
  baseline = compiled[f"{parallelism}/baseline"]["collectives"]
  assert compiled[f"{parallelism}/compressed"]["collectives"] == baseline
  assert baseline["all-reduce"] > 0  # the count sees the collectives that are there


def test_compressed_steps_keep_no_full_size_constant(measured):
  """A literal in a rebuilt residual (`2 * x` rebuilt from `x - mean`, see jact._affine) enters
  as a runtime value: as a constant, XLA broadcast it to a full activation at the start of the
  step for LayerNorm's backward reductions and kept it alive (16 MiB per device here; the
  uncompressed steps hold such constants of their own)."""
  compiled = measured["compiled"]
  for name in ("one device", "data", "tensor"):
    assert compiled[f"{name}/compressed"]["large_constants"] == 0, name


def temp_ratio(compiled: dict, name: str) -> float:
  return compiled[f"{name}/compressed"]["temp_bytes"] / compiled[f"{name}/baseline"]["temp_bytes"]


def test_tensor_parallel_temp_falls_as_on_one_device(measured):
  """Every residual, sharded or replicated over "model", is compressed as on one device, so the
  per-device compiled temp bytes fall by the one-device ratio."""
  compiled = measured["compiled"]
  assert temp_ratio(compiled, "tensor") == pytest.approx(temp_ratio(compiled, "one device"), rel=0.1)


def test_data_parallel_device_needs_what_one_device_needs_for_its_share(measured):
  """A data-parallel device runs the one-device step on an eighth of the batch, then all-reduces
  the gradients: XLA combines those all-reduces into one at the end, which keeps up to one
  gradient-sized buffer alive at the compressed step's peak. (The ratio to the baseline is higher
  than on one device for that reason and because XLA's schedule of the partitioned *baseline*
  keeps less alive than the one-device baseline of the same per-device shapes; see README, "Many
  devices".)"""
  compiled = measured["compiled"]
  share = compiled["one device, batch / 8/compressed"]["temp_bytes"]
  assert compiled["data/compressed"]["temp_bytes"] <= share + compiled["gradient_bytes"]
  assert compiled["data/compressed"]["temp_bytes"] < 0.5 * compiled["data/baseline"]["temp_bytes"]


def test_data_parallel_gradients_equal_one_device(measured):
  """The partitioned program keeps global semantics: every example's activations are computed as
  on one device, so each residual is quantised with the same groups, global element indices and
  noise; only the batch sum of weight gradients is reassociated."""
  assert measured["gradients"]["data vs one device"]["max_abs"] <= FLOAT32_RTOL


def test_tensor_parallel_gradients_are_an_equally_accurate_draw(measured):
  """Row-parallel layers sum partial products across devices in another order, which changes the
  last bits of the activations downstream; stochastic rounding hashes each element's bits, so
  those elements get fresh noise. The gradient is another draw of the same unbiased estimator:
  its error norm sums millions of independent roundings, so it matches the one-device error closely."""
  gradients = measured["gradients"]
  one_device = gradients["one device vs exact"]["norm"]
  assert gradients["tensor vs exact"]["norm"] == pytest.approx(one_device, rel=0.25)


def test_compression_inside_shard_map_matches_one_device(measured):
  """Inside shard_map each device compresses its local arrays; with nearest rounding the groups
  and codes are those of one device, so gradients match the one-device compressed run."""
  inside, plain = measured["shard_map"]["inside"], measured["shard_map"]["plain"]
  assert "error" not in inside, inside.get("error")
  assert inside["collectives"] == plain["collectives"]
  assert inside["vs one device"]["max_abs"] <= FLOAT32_RTOL
  assert inside["temp_bytes"] < plain["temp_bytes"]


def test_compression_around_shard_map_is_as_accurate_as_one_device(measured):
  """remat_compress of a function that calls shard_map follows the shard_map's body to tell
  parameters from activations, and stores the body's residuals compressed. The body is not
  rewritten (elementwise chains inside it keep their several residuals), so its gradient is
  another draw at the same width, not the one-device codes: its error norm, summing millions of
  roundings, matches the one-device compressed error closely."""
  around, plain = measured["shard_map"]["around"], measured["shard_map"]["plain"]
  assert "error" not in around, around.get("error")
  assert around["collectives"] == plain["collectives"]
  assert around["temp_bytes"] < plain["temp_bytes"]
  assert around["vs exact"]["norm"] == pytest.approx(around["one device vs exact"]["norm"], rel=0.25)


def test_group_spanning_devices_is_a_clear_error():
  """With explicit mesh axes, a group that would span devices is refused, naming group_size."""
  script = (
      "import jax, jax.numpy as jnp, jact\n"
      "from jax.sharding import NamedSharding, PartitionSpec as P, AxisType\n"
      "mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(AxisType.Explicit,) * 2)\n"
      "x = jax.device_put(jnp.ones((64, 32, 512)), NamedSharding(mesh, P('data', None, 'model')))\n"
      "with jax.set_mesh(mesh):\n"
      "  print(jax.jit(lambda x: jact.quantize(x, 2, group_size=64))(x).nbytes)\n"
      "  jax.jit(lambda x: jact.quantize(x, 2))(x)\n")
  env = {**__import__("os").environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
  assert result.stdout.strip() == str(64 * 32 * 512 // 4 + 4 * 64 * 32 * 512 // 64)
  assert "ValueError: cannot group an array of shape (64, 32, 512)" in result.stderr
  assert "Choose a group_size that divides each device's share" in result.stderr
