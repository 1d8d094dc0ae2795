"""Flax NNX integration: compressed NNX modules and functions of NNX modules.

An NNX module is stateful; `remat_compress` wants a pure function of arrays. At each call the
modules among the arguments are split (`nnx.split`) into a graph definition, their parameters
and their other state (batch statistics, RNG keys and counters, ...), a pure function merges them
back, runs the call and returns the new non-parameter state, and `remat_compress` wraps that
function with parameters and state in `keep_argnums`. The new state is written back with
`nnx.update`, so `nnx.BatchNorm` statistics and `nnx.Dropout` RNG counters advance exactly as
without compression, under `nnx.jit`, `nnx.grad` and `nnx.value_and_grad` alike.

Module classes and instances. `compress(Block, ...)` returns a subclass named `Block` whose
`__call__` is compressed; `compress(block, ...)` gives an existing instance that class in place
and returns it. Either way the attributes, and so the state paths, are those of the uncompressed
module: checkpoints load unchanged, and a parent module holding the block keeps holding it.

Residual names are `<name>/<label>`, with `name` the class name unless given. NNX modules do not
know their path in the model: repeated calls of one class are numbered in trace order
(`Block`, `Block_1`, ...; see `jact._naming`), so policies and calibration address each; a
`name=` given is used as it is, for every call.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import jax
from flax import nnx

from jact import _options, _wrapping, policies
from jact._options import Options


def is_module(target: Any) -> bool:
  """Whether `target` is a Flax NNX Module class or instance."""
  return isinstance(target, nnx.Module) or inspect.isclass(target) and issubclass(target, nnx.Module)


def _check_no_nested_nodes(name: str, args: tuple, kwargs: dict) -> None:
  """Graph nodes become kept state only as positional arguments; elsewhere their updates would be
  lost, so they are an error."""
  is_node = lambda x: isinstance(x, nnx.Pytree)
  for path, leaf in jax.tree_util.tree_leaves_with_path((args, kwargs), is_leaf=is_node):
    positional, top = path[0].idx == 0, path[1]
    if is_node(leaf) and not (positional and len(path) == 2):
      where = f"inside argument {top.idx}" if positional else f"in keyword argument {top.key!r}"
      raise TypeError(f"{name}: an NNX {type(leaf).__name__} {where}; NNX modules and other graph "
                      "nodes must be positional arguments of a compressed call.")


def _compress_function(fn: Callable, options: Options, name: str) -> Callable:
  """`fn` with its residuals compressed and the NNX graph nodes among its arguments as kept state."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    _check_no_nested_nodes(name, args, kwargs)
    node_positions = [i for i, a in enumerate(args) if isinstance(a, nnx.Pytree)]
    positions = [i for i in range(len(args)) if i not in node_positions]
    others = [args[i] for i in positions]
    if not node_positions:
      return _wrapping.wrap(options, fn, name=name, num_state=0, positions=positions)(*others, **kwargs)
    nodes = tuple(args[i] for i in node_positions)
    graphdef, params, state = nnx.split(nodes, nnx.Param, ...)

    def pure(params, state, *others, **kwargs):
      merged = nnx.merge(graphdef, params, state)
      full = list(others)
      for i, node in zip(node_positions, merged):
        full.insert(i, node)
      out = fn(*full, **kwargs)
      _, _, new_state = nnx.split(merged, nnx.Param, ...)
      return out, new_state

    pure = _wrapping.with_arg_names(pure, ("params", "state"), fn, positions)
    out, new_state = _wrapping.wrap(options, pure, name=name, num_state=2, positions=positions)(
        params, state, *others, **kwargs)
    nnx.update(nodes, new_state)
    return out

  return wrapped


NNX_NOTES = {"static_argnums": "positional arguments passed as they are; `self` is argument 0 for methods "
                               "and module classes."}


@_options.takes_options(excluded=("keep_argnums",), notes=NNX_NOTES)
def compress_function(fn: Callable, bits: policies.BitsOrPolicy = 2, **options: Any) -> Callable:
  """`remat_compress` for a function whose positional arguments may be NNX modules.

  Graph nodes among the positional arguments (any `nnx.Pytree`: modules, `nnx.Rngs`,
  `nnx.List`) are split into parameters and other state, both kept; the other arguments are
  compressible. State changes made by the call are written back; parameters are read, not
  updated. A function of arrays alone is simply `remat_compress`ed.

  Args:
    fn: the function, e.g. `lambda model, x: model(x)` or a method of an NNX Module class.
    bits: an int width or a policy; `jact.use_policy` overrides it at trace time.
    {options}

  Returns:
    The compressed function, same signature. Without a `name`, residual names start with
    `Class` or `Class.method` for a method defined in a class body, else `fn.__name__`.
  """
  return compress_function_with(fn, Options.create(bits, entry="jact.nnx.compress_function",
                                                   excluded=("keep_argnums",), **options))


def compress_function_with(fn: Callable, options: Options) -> Callable:
  """`compress_function` with its options already checked."""
  class_name, suffix = _wrapping.method_scope(fn)
  return _compress_function(fn, options, options.name or (class_name + suffix if class_name else fn.__name__))


@functools.lru_cache(maxsize=None)
def _compressed_class(module_class: type, options: Options, name: str) -> type:
  namespace = {"__call__": _compress_function(module_class.__call__, options, name),
               "__module__": module_class.__module__, "__qualname__": module_class.__qualname__}
  # NNX does not inherit pytree-ness: state it, so the subclass flattens like `module_class`.
  return type(module_class.__name__, (module_class,), namespace,
              pytree=module_class._pytree__is_pytree)


@_options.takes_options(excluded=("keep_argnums",), notes=NNX_NOTES)
def compress(target: Any = None, bits: policies.BitsOrPolicy = 2, **options: Any) -> Any:
  """Compresses the residuals of an NNX module's `__call__`.

  Example::

    model.blocks[3] = jact.nnx.compress(model.blocks[3], bits=2)   # or jact.compress(...)

    @jact.compress(bits=4)
    class MLP(nnx.Module): ...

  Args:
    target: an NNX Module class, or an instance (changed in place: its class becomes the
      compressed subclass, its state and identity stay). Without it, returns a decorator.
    bits: an int width or a policy; `jact.use_policy` overrides it at trace time.
    {options}

  Returns:
    The compressed subclass (same name, same attributes), or the instance. Without a `name`,
    residual names start with the class name.
  """
  checked = Options.create(bits, entry="jact.nnx.compress", excluded=("keep_argnums",), **options)
  if target is None:
    return functools.partial(compress, **checked.user_options(excluded=("keep_argnums",)))
  return compress_with(target, checked)


def compress_with(target: Any, options: Options) -> Any:
  """`compress(target, ...)` with its options already checked."""
  if not is_module(target):
    raise TypeError(f"jact.nnx.compress expects a Flax NNX Module class or instance, got {target!r}.")
  module_class = target if inspect.isclass(target) else type(target)
  compressed_class = _compressed_class(module_class, options, options.name or module_class.__name__)
  if inspect.isclass(target):
    return compressed_class
  target.__class__ = compressed_class
  return target
