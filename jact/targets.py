"""Compiling for a GPU without one: the compile-only targets `jact.memory.compiled(target=...)` uses.

XLA compiles for an NVIDIA GPU from a description of the card ("deviceless" ahead-of-time
compilation), so XLA:GPU's own buffer assignment -- the figure that decides whether a batch fits
where users train -- can be read on a machine without a GPU. It needs the CUDA PJRT plugin
(`pip install 'jax-act[gpu-compile]'`, about 350 MB, no NVIDIA libraries); the descriptions of an
H100 SXM 80 GB and an H200 141 GB ship with jact (`jact/gpu_targets/`), and any other card's
`gpu_device_info` text can be given instead.

With the plugin installed, `import jax` on a machine without a GPU tries to start CUDA and prints
an error before falling back to the CPU: set `JAX_PLATFORMS=cpu`.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

TARGETS_DIR = pathlib.Path(__file__).resolve().parent / "gpu_targets"
NAMED_TARGETS = ("h100", "h200")


def target_text(target: str) -> str:
  """The target description of `target`: "h100", "h200", a path to a `.txtpb` file, or its text."""
  if not isinstance(target, str):
    raise TypeError(f"target must be 'cpu', one of {NAMED_TARGETS}, a path to a target description "
                    f"or its text; got {type(target).__name__}.")
  if target.lower() in NAMED_TARGETS:
    return (TARGETS_DIR / f"{target.lower()}.txtpb").read_text()
  if "gpu_device_info" in target:
    return target
  path = pathlib.Path(target)
  if path.suffix in (".txtpb", ".pbtxt", ".txt") and path.is_file():
    return path.read_text()
  raise ValueError(f"unknown target {target!r}: use 'cpu', one of {NAMED_TARGETS}, a path to a GPU "
                   "target description (.txtpb) or the text of one (with a gpu_device_info block).")


def check_plugin() -> None:
  """Raises an ImportError that says what to install when the CUDA plugin is missing."""
  if importlib.util.find_spec("jax_plugins.xla_cuda13") is None and importlib.util.find_spec(
      "jax_plugins.xla_cuda12") is None:
    raise ImportError(
        "compiling for a GPU target needs JAX's CUDA plugin, at the installed jax's version: "
        f"pip install 'jax-act[gpu-compile]' (or pip install jax-cuda13-plugin=={jax.__version__}); "
        "then set JAX_PLATFORMS=cpu on a machine without a GPU.")


@functools.lru_cache(maxsize=8)
def mesh_for(text: str) -> jax.sharding.Mesh:
  """A one-device mesh of the compile-only GPU described by `text`."""
  from jax.experimental import topologies
  check_plugin()
  topology = topologies.get_topology_desc(platform="cuda", target_config=text, topology="1x1x1")
  return topologies.make_mesh(topo=topology, mesh_shape=(1,), axis_names=("device",))


def on_target(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """`tree`'s arrays as abstract values placed on the compile-only GPU of `mesh` (replicated)."""
  sharding = NamedSharding(mesh, PartitionSpec())

  def place(x):
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return x

  return jax.tree.map(place, tree)


def compile_for(jitted: Any, target: str, *args: Any, compiler_options: dict | None = None, **kwargs: Any) -> Any:
  """`jitted` compiled for `target`: "cpu" (this process's default backend), or a GPU without
  one (see `target_text`): then arrays among the arguments become abstract values on that GPU,
  and Pallas kernels lower for its compute capability."""
  return lower_for(jitted, target, *args, **kwargs).compile(compiler_options=compiler_options)


def lower_for(jitted: Any, target: str, *args: Any, **kwargs: Any) -> Any:
  """`jitted` lowered for `target` (see `compile_for`), not compiled yet."""
  if target == "cpu":
    return jitted.lower(*args, **kwargs)
  mesh = mesh_for(target_text(target))
  device = mesh.devices.flat[0]
  abstract_device = jax.sharding.AbstractDevice(_kind_for_kernels(device.device_kind), device.core_count, "gpu")
  args, kwargs = on_target((args, kwargs), mesh)
  # Triton lowers a kernel for the device of the abstract mesh in context (the default device
  # here is the CPU).
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=abstract_device)):
    return jitted.lower(*args, **kwargs)


def _kind_for_kernels(device_kind: str) -> str:
  """The device kind as JAX's GPU table names it ("NVIDIA H100 80GB HBM3" -> "NVIDIA H100")."""
  try:
    from jax._src import gpu_info  # the table Pallas' Triton lowering reads (private: may move)
  except ImportError:
    return device_kind
  known = [version.value for version in gpu_info.GpuVersion if device_kind.startswith(version.value)]
  return max(known, key=len) if known else device_kind
