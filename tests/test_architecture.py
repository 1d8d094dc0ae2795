"""The package's structure: no import cycles inside jact/, and Pallas loaded only when a kernel runs."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jact"


def module_name(path: pathlib.Path) -> str:
  parts = ["jact", *path.relative_to(PACKAGE).with_suffix("").parts]
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """jact module -> the jact modules it imports, at module level or inside functions.

  Importing `jact.a.b` runs `jact.a` first, so that counts as an import of both, except for a
  module's own packages, which have started running before it does. The root package `jact`
  only re-exports and is left out (every module would otherwise reach it)."""
  modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
        targets.add(base)
        targets.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules)
    edges = set()
    for target in targets:
      parts = target.split(".")
      edges.update(".".join(parts[:k]) for k in range(2, len(parts) + 1) if ".".join(parts[:k]) in modules)
    own_packages = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)}
    graph[name] = edges - {name} - own_packages
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_in_jact():
  graph = import_graph()
  assert {"jact.transform", "jact.codec.reference", "jact.kernels.pallas_codec"} <= set(graph)
  assert "jact.codec" in graph["jact.kernels.pallas_codec"]  # the kernels build on the codec ...
  cycle = find_cycle(graph)
  assert cycle is None, " -> ".join(cycle)  # ... never the reverse, and nothing else loops


def test_pallas_kernels_are_imported_only_when_a_kernel_can_run():
  """The reference path never imports Pallas' kernels; "auto" does only where a GPU can be
  targeted (a GPU backend, or the CUDA plugin for compiling without one), "pallas" always."""
  script = """
import importlib.util, sys
import jax, jax.numpy as jnp
import jact
x = jnp.linspace(-1.0, 1.0, 8192)
assert "jact.kernels.pallas_codec" not in sys.modules, "import jact loaded the kernels"
jax.grad(lambda x: jact.remat_compress(jnp.sin, bits=2, kernel="xla")(x).sum())(x)
jact.dequantize(jact.quantize(x, 4, kernel="xla"), kernel="xla")
assert "jact.kernels.pallas_codec" not in sys.modules, "the reference path imported the kernels"
jact.dequantize(jact.quantize(x, 4))
gpu_possible = importlib.util.find_spec("jax_plugins.xla_cuda13") is not None
assert ("jact.kernels.pallas_codec" in sys.modules) == gpu_possible, "auto and the kernels disagree"
jact.quantize(x, 4, kernel="pallas")
assert "jact.kernels.pallas_codec" in sys.modules
print("ok")
"""
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={"JAX_PLATFORMS": "cpu", "PATH": ""}, timeout=300)
  assert result.stdout.strip() == "ok", result.stderr
