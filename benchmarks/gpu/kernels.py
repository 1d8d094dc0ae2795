"""GPU check of the Pallas codec kernels: bitwise agreement with the jnp reference, and throughput.

  python benchmarks/gpu/kernels.py            # on a GPU: writes $OUT/gpu_kernels.json (default ./results)
  python benchmarks/gpu/kernels.py --small    # smoke test anywhere: tiny tensors, interpret mode off GPU
  python benchmarks/gpu/kernels.py --parts throughput    # one part only

1. correctness: for every dtype x bits x rounding at group size 256 (and group sizes 64 and 1024
   for float32), `quantize_pallas` / `dequantize_pallas` against `jact.codec` on the same device,
   bit for bit, counted per kind of group (`jact.kernels.bitwise.special_groups`) and for a padded
   tail, so a mismatch says which arithmetic differs. "dequantize_only" decodes the reference's
   codes with the kernel, which separates the two kernels.
2. throughput: quantise and dequantise of a 1 GiB float32 and a 1 GiB bfloat16 tensor, Pallas
   against the XLA reference, in GB/s of bytes read plus written, and as a fraction of the device's
   copy bandwidth (x + 1: reads and writes the tensor once); plus a sweep of `block_rows`, and a
   bitwise comparison of both kernels' codes of the large tensor (many programs, large indices).
3. `step_time_comparison`: the hook for training-step times with either kernel.

Needs only jax (and jact). Each case records its error instead of stopping the run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from jact import codec
from jact.kernels import bitwise, pallas_codec
from jact.kernels.pallas_codec import dequantize_pallas, quantize_pallas

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
BITS = (1, 2, 4, 8)
ROUNDINGS = ("stochastic", "nearest")
SEEDS = (0, 12345)
TAIL_SHAPE = (3, 5, 7, 11)  # 1155 values: the padded fallback layout for every group size >= 64
THROUGHPUT_GROUP_SIZE = 256
BLOCK_ROWS_SWEEP = (4, 8, 16, 32, 64)
PARTS = ("correctness", "throughput", "step_time")


def check_correctness() -> list[dict]:
  """Bitwise comparison of kernels and reference for every configuration; one record each."""
  configs = [(dtype, bits, rounding, 256) for dtype in DTYPES for bits in BITS for rounding in ROUNDINGS]
  configs += [(jnp.float32, bits, "stochastic", size) for size in (64, 1024) for bits in BITS]
  records = []
  for dtype, bits, rounding, group_size in configs:
    record = {"dtype": jnp.dtype(dtype).name, "bits": bits, "rounding": rounding, "group_size": group_size}
    try:
      record["differing_groups"] = _compare(dtype, bits, rounding, group_size)
      record["bit_identical"] = not any(n for kind in record["differing_groups"].values() for n in kind.values())
    except Exception as error:  # a failing case is a result, not the end of the run
      record["error"] = _describe(error)
    records.append(record)
    print(f"correctness {record['dtype']:8} bits={bits} {rounding:10} group_size={group_size:5} "
          f"{record.get('bit_identical', 'ERROR')}", flush=True)
  return records


def _compare(dtype, bits: int, rounding: str, group_size: int) -> dict[str, dict[str, int]]:
  """Kind of group -> {leaf: number of groups whose bits differ}, over both seeds."""
  kinds = bitwise.special_groups(dtype, group_size)
  labels = np.concatenate([[kind] * len(rows) for kind, rows in kinds.items()])
  inputs = {"groups": jnp.asarray(np.concatenate(list(kinds.values())), dtype)}
  if rounding == "stochastic":
    inputs["padded_tail"] = jnp.asarray(np.random.default_rng(1).standard_normal(TAIL_SHAPE), dtype)
  counts: dict[str, dict[str, int]] = {}
  for name, x in inputs.items():
    for seed in SEEDS:
      expected = codec.quantize(x, bits, group_size, rounding, seed)
      actual = quantize_pallas(x, bits, group_size, rounding, seed)
      per_group = bitwise.group_differences(actual, expected)
      decoded = bitwise.differs(dequantize_pallas(actual), codec.dequantize(expected))
      per_group["values"] = expected.layout.to_groups(decoded).any(-1)
      decoded_reference = bitwise.differs(dequantize_pallas(expected), codec.dequantize(expected))
      per_group["dequantize_only"] = expected.layout.to_groups(decoded_reference).any(-1)
      group_kinds = labels if name == "groups" else np.full(len(per_group["lo"]), name)
      for leaf, differ in per_group.items():
        for kind in np.unique(group_kinds):
          kind_counts = counts.setdefault(str(kind), {})
          kind_counts[leaf] = kind_counts.get(leaf, 0) + int(differ[group_kinds == kind].sum())
  return counts


def measure_throughput(nbytes: int) -> list[dict]:
  """Seconds and GB/s of quantise / dequantise of an `nbytes` tensor per dtype, bits and kernel,
  and whether the Pallas and XLA codes of that tensor agree bit for bit."""
  records = []
  for dtype in (jnp.float32, jnp.bfloat16):
    x = jax.random.normal(jax.random.key(0), (nbytes // jnp.dtype(dtype).itemsize // 4096, 4096), dtype)
    name = jnp.dtype(dtype).name
    copy_seconds = seconds_per_call(jax.jit(lambda x: x + 1), x)
    copy_bandwidth = 2 * x.nbytes / copy_seconds
    records.append({"dtype": name, "op": "copy (x + 1)", "kernel": "xla", "seconds": copy_seconds,
                    "bytes": 2 * x.nbytes, "gb_per_s": copy_bandwidth / 1e9, "fraction_of_copy": 1.0})
    for bits in BITS:
      kernels = {"xla": (codec.quantize, codec.dequantize), "pallas": (quantize_pallas, dequantize_pallas)}
      if bits == 2:
        kernels |= {f"pallas block_rows={rows}": (functools.partial(quantize_pallas, block_rows=rows),
                                                  functools.partial(dequantize_pallas, block_rows=rows))
                    for rows in BLOCK_ROWS_SWEEP}
      codes = {}
      for kernel, (quantize, dequantize) in kernels.items():
        record = {"dtype": name, "bits": bits, "group_size": THROUGHPUT_GROUP_SIZE, "kernel": kernel}
        try:
          records += _time_codec(x, record, quantize, dequantize, copy_bandwidth, codes)
        except Exception as error:  # a kernel that fails to build is a result, not the end of the run
          records.append(record | {"error": _describe(error)})
          print(f"throughput {name:8} bits={bits} {kernel:22} ERROR", flush=True)
      if {"xla", "pallas"} <= codes.keys():
        differing = {leaf: int(d.sum()) for leaf, d in bitwise.group_differences(codes["pallas"], codes["xla"]).items()}
        records.append({"dtype": name, "bits": bits, "op": "compare codes", "differing_groups": differing})
        print(f"throughput {name:8} bits={bits} groups whose codes differ: {differing}", flush=True)
    del x
  return records


def _time_codec(x, record: dict, quantize, dequantize, copy_bandwidth: float, codes: dict) -> list[dict]:
  """Timed records of one quantise / dequantise pair on `x`; keeps its codes in `codes` by kernel."""
  quantize = jax.jit(functools.partial(quantize, bits=record["bits"], group_size=record["group_size"],
                                       rounding="stochastic", seed=0))
  q = quantize(x)
  if record["kernel"] in ("xla", "pallas"):
    codes[record["kernel"]] = q
  moved = x.nbytes + q.nbytes  # either direction reads one and writes the other
  records = []
  for op, seconds in (("quantize", seconds_per_call(quantize, x)), ("dequantize", seconds_per_call(jax.jit(dequantize), q))):
    fraction = moved / seconds / copy_bandwidth
    records.append(record | {"op": op, "seconds": seconds, "bytes": moved, "gb_per_s": moved / seconds / 1e9,
                             "fraction_of_copy": fraction})
    print(f"throughput {record['dtype']:8} bits={record['bits']} {record['kernel']:22} {op:10} "
          f"{moved / seconds / 1e9:8.1f} GB/s  {fraction:6.1%} of copy", flush=True)
  return records


def seconds_per_call(fn, *args, calls: int = 10, repeats: int = 5) -> float:
  """Best over `repeats` of the mean time of `calls` back-to-back calls (after one warm-up call)."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / calls)
  return best


def step_time_comparison(small: bool) -> dict:
  """Hook: training-step time of models with residuals compressed by the Pallas vs the XLA codec.

  To be filled with the model zoo once the codec dispatches on a `kernel=` argument; it should
  return, per model, the step times (uncompressed, kernel="xla", kernel="pallas") measured
  interleaved in this process, with `small` selecting tiny models for a smoke test.
  """
  del small
  return {"status": "not implemented yet"}


def _describe(error: Exception) -> str:
  return "".join(traceback.format_exception_only(error)).strip()[-2000:]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--small", action="store_true", help="tiny tensors, for a smoke test on any backend")
  parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="what to run (default: all)")
  args = parser.parse_args()
  out_dir = pathlib.Path(os.environ.get("OUT", "results"))
  out_dir.mkdir(parents=True, exist_ok=True)
  device = jax.devices()[0]
  results = {
      "jax_version": jax.__version__, "backend": jax.default_backend(), "device": device.device_kind,
      "small": args.small, "kernels_interpreted": jax.default_backend() != "gpu",
      "elements_per_block": pallas_codec.ELEMENTS_PER_BLOCK, "num_warps": pallas_codec.NUM_WARPS,
  }
  start = time.perf_counter()
  if "correctness" in args.parts:
    results["correctness"] = check_correctness()
    results["all_bit_identical"] = all(r.get("bit_identical", False) for r in results["correctness"])
    print(f"all bit-identical: {results['all_bit_identical']}", flush=True)
  if "throughput" in args.parts:
    results["throughput"] = measure_throughput(2**20 if args.small else 2**30)
  if "step_time" in args.parts:
    results["step_time"] = step_time_comparison(args.small)
  results["wall_seconds"] = time.perf_counter() - start
  path = out_dir / "gpu_kernels.json"
  path.write_text(json.dumps(results, indent=1))
  print(f"{results['wall_seconds']:.0f} s; wrote {path}")


if __name__ == "__main__":
  main()
