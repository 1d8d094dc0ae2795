"""What the Flax paths (linen and NNX) share: wrapping a pure function of state and arguments.

Both turn a module call into a pure function `fun(*state, *args)` whose leading state arguments
(variables, RNG streams, NNX state) are kept and whose other arguments are compressible, and both
count `static_argnums` as the user wrote them (`self` is argument 0).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Sequence

from jact._options import Options
from jact.transform import compress_with


def wrap(options: Options, fun: Callable, *, name: str, num_state: int, positions: Sequence[int],
         numbered: bool | None = None) -> Callable:
  """`remat_compress` of `fun(*state, *args)`, with the `num_state` state arguments kept.

  Args:
    options: the entry point's options; `static_argnums` count positions of the decorated callable.
    fun: the pure function; its first `num_state` arguments are variables (never compressed).
    name: the scope of residual names.
    num_state: how many leading arguments of `fun` are state.
    positions: for each later argument of `fun`, its position in the decorated callable, so
      that `static_argnums` (counted there) can be found among them.
    numbered: whether repeated calls get distinct scopes (`jact._naming`); default: unless the
      user named the call.

  Returns:
    The wrapped function.
  """
  positions = list(positions)
  static = []
  for argnum in options.static_argnums:
    if argnum not in positions:
      raise ValueError(f"static_argnums={options.static_argnums} of {name!r}: argument {argnum} is "
                       f"not a positional argument of this call (it has positions {positions}; "
                       "a module itself is never static).")
    static.append(num_state + positions.index(argnum))
  return compress_with(fun, dataclasses.replace(options, keep_argnums=tuple(range(num_state)),
                                                static_argnums=tuple(static), name=name,
                                                numbered=options.numbered if numbered is None else numbered))


def with_arg_names(fun: Callable, state_names: Sequence[str], source: Callable,
                   positions: Sequence[int]) -> Callable:
  """Gives `fun(*state, *args)` the parameter names of `source` at `positions`.

  `remat_compress` names input residuals after the wrapped function's parameters; this keeps the
  user's names (`Block_3/x`) for the arguments that pass through a pure wrapper.

  Args:
    fun: the pure wrapper, `fun(*state, *args)`; its `__signature__` is set.
    state_names: names of its leading state arguments.
    source: the user's function or method whose parameter names the later arguments take.
    positions: the position in `source` of each later argument (a name that is not positional
      there, or clashes with a state name, becomes `arg<position>`).

  Returns:
    `fun`.
  """
  try:
    params = list(inspect.signature(source).parameters.values())
  except (TypeError, ValueError):  # no signature (a builtin): positional names
    params = []
  positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  names = [params[i].name if i < len(params) and params[i].kind in positional
           and params[i].name not in state_names else f"arg{i}" for i in positions]
  fun.__signature__ = inspect.Signature(
      [inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in [*state_names, *names]])
  return fun


def method_scope(fun: Callable) -> tuple[str | None, str]:
  """(class name, method suffix) of a function defined in a class body, as Flax names scopes.

  The suffix is "" for `__call__` and ".name" otherwise; the class name is None for a function
  not defined in a class.
  """
  parts = getattr(fun, "__qualname__", getattr(fun, "__name__", type(fun).__name__)).split(".")
  if len(parts) < 2 or parts[-2] == "<locals>":
    return None, ""
  return parts[-2], "" if parts[-1] == "__call__" else f".{parts[-1]}"
