"""Equinox modules under `jact.compress`: a module class or instance whose `__call__` is compressed.

An Equinox module is a pytree holding its parameters (arrays) and its configuration (functions,
ints, ...). `remat_compress` takes one as an argument as it is: its arrays are traced, the rest is
static. `jact.compress(Block)` returns a subclass named `Block` whose `__call__` runs through
`remat_compress` with the module (`self`) kept -- its parameters are never compressed -- and the
other arguments compressible; `jact.compress(block)` returns an instance of that subclass with the
same fields (modules are immutable, so it is a new object). The fields and so the pytree's leaves
are those of the uncompressed module: `eqx.filter_grad`, optax updates and serialisation see the
same parameters.

Equinox is not imported here: a module can only be an Equinox module if the user imported it.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any

from jact._options import Options
from jact.transform import compress_with as compress_function


def is_module(target: Any) -> bool:
  """Whether `target` is an Equinox Module class or instance."""
  eqx = sys.modules.get("equinox")
  if eqx is None:
    return False
  return isinstance(target, eqx.Module) or inspect.isclass(target) and issubclass(target, eqx.Module)


def compress_with(target: Any, options: Options) -> Any:
  """The compressed class of an Equinox Module class, or an instance of it for an instance."""
  cls = target if inspect.isclass(target) else type(target)
  if getattr(cls, "__jact_compressed__", False):
    raise TypeError(f"jact.compress: {cls.__name__} is already compressed.")
  method = next((vars(c)["__call__"] for c in cls.__mro__ if "__call__" in vars(c)), None)
  if method is None:
    raise TypeError(f"jact.compress: the Equinox module {cls.__name__} has no __call__ to compress.")
  call = compress_function(method, dataclasses.replace(
      options, keep_argnums=(0,), name=options.name or cls.__name__))

  def __call__(self, *args, **kwargs):
    return call(self, *args, **kwargs)

  __call__.__doc__ = method.__doc__
  compressed = type(cls)(cls.__name__, (cls,), {"__call__": __call__, "__jact_compressed__": True,
                                                "__module__": cls.__module__,
                                                "__qualname__": cls.__qualname__})
  if inspect.isclass(target):
    return compressed
  instance = object.__new__(compressed)
  for key, value in vars(target).items():
    object.__setattr__(instance, key, value)
  return instance
