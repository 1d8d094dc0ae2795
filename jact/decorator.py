"""`jact.compress`: one decorator for linen modules, NNX modules, methods and functions."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import flax.linen as nn

from jact import _equinox, _options, flax as jact_linen, nnx as jact_nnx, policies
from jact._options import Options

NOTES = {"static_argnums": "positional arguments passed as they are, counted as written (`self` is 0 for "
                           "methods and module classes).",
         "name": "the scope of residual names (default: the module's name, the class name for NNX, "
                 "the function's name)."}


@_options.takes_options(excluded=("keep_argnums",), notes=NOTES)
def compress(target: Any = None, bits: policies.BitsOrPolicy = 2, **options: Any) -> Any:
  """Compresses the residuals of a Flax module or a function; the decorator form of jact.

  Dispatches on what it decorates:

  * a linen Module class: `jact.compressed(target)`, a class with the same name and variables;
  * a Flax NNX Module class or instance: `jact.nnx.compress(target)` (an instance is changed in
    place, see there);
  * an Equinox Module class or instance: a subclass with the same name and fields whose
    `__call__` is compressed, the module's parameters kept (for an instance, a new instance of
    that subclass: Equinox modules are immutable);
  * a function or method: at each call, a linen module as first argument takes the linen path
    (as `compressed` on a method, so it can decorate `@nn.compact __call__`); otherwise NNX
    modules among the positional arguments are split into parameters and state (kept) and the
    rest is compressed (`jact.nnx.compress_function`), which for a function of arrays alone is
    `remat_compress`.

  Example::

    @jact.compress(bits=4)
    class MLP(nn.Module): ...

    class Net(nn.Module):
      @jact.compress(bits=2)
      @nn.compact
      def __call__(self, x): ...

    block = jact.compress(nnx_block, bits=2)

  Args:
    target: what to compress; without it, returns a decorator.
    bits: an int width or a policy; `jact.use_policy` overrides it at trace time.
    {options}

  Returns:
    The compressed class, module, method or function.
  """
  checked = Options.create(bits, entry="jact.compress", excluded=("keep_argnums",), **options)
  if target is None:
    return functools.partial(compress, **checked.user_options(excluded=("keep_argnums",)))
  if jact_linen.is_linen_class(target) or isinstance(target, nn.Module):
    return jact_linen.compressed_with(target, checked)  # an instance: it explains what to pass instead
  if jact_nnx.is_module(target):
    return jact_nnx.compress_with(target, checked)
  if _equinox.is_module(target):
    return _equinox.compress_with(target, checked)
  if not callable(target) or inspect.isclass(target):
    raise TypeError(f"jact.compress expects a linen Module class, a Flax NNX Module (class or "
                    f"instance), an Equinox Module (class or instance), a method or a function; got {target!r} of type "
                    f"{type(target).__name__}.")
  linen_method = jact_linen.compressed_with(target, checked)
  other = jact_nnx.compress_function_with(target, checked)

  @functools.wraps(linen_method)  # carries Flax's method markers (compact, method_handler_wrapped)
  def dispatch(*args, **call_kwargs):
    if args and isinstance(args[0], nn.Module):
      return linen_method(*args, **call_kwargs)
    return other(*args, **call_kwargs)

  return dispatch
