"""Flax integration: `compressed` (linen, a lifted transform like `nn.remat`) and `compress`.

`compressed(Block, bits=...)` is to `remat_compress` what `nn.remat(Block)` is to
`jax.checkpoint`: one application of Flax's own lifting (`lift_transform` over `lift.pack`), so
variables, RNG streams, mutable collections and nesting (`nn.scan`, `nn.remat`, `nn.jit`) work as
they do for every linen transform. `compress` is the one decorator for everything: a linen Module
class, a linen method, a Flax NNX module (see `jact.nnx`) or a plain function.

What is kept and what is compressed. Inside the lifted call, every variable collection (`params`,
`batch_stats`, ...) and every RNG stream is an argument in `keep_argnums`: parameters are alive
anyway and are never compressed. The arguments of the call (the activations entering the module)
and everything computed inside it are compressible.

Residual names. A residual of a compressed module is named `<module path>/<label>`: the module
path is the named scopes Flax pushes for the enclosing modules (`Net`; on by default, see
`flax.config.flax_profile`) and the compressed module's own name (`Block_3`, or `Block_3.encode`
for a method other than `__call__`); the label is the argument's name (`x`) or the named scopes
inside the module and the primitive (`.../Dense_0/dot_general0`). Names depend only on the module
tree, so they are the same at every call and in every process, and `jact.policies.by_name`
patterns and calibrated tables can address them (`"Net/Block_3/*"`). With Flax's named scopes
off (`nn.override_named_call(False)`), names keep only the compressed module's own name.

Parameter paths. Unlike `nn.remat` (whose auto-named submodules become `CheckpointBlock_0`), the
class returned by `compressed(Block)` is named `Block`, so auto-naming gives `Block_0`, `Block_1`
as before: a compressed model has exactly the variable tree of the uncompressed one and loads its
checkpoints.

Changing the policy of a built model. Bits are chosen when a compressed call is traced, and
`jact.use_policy(policy)` overrides the bits of every compressed call traced inside it, compressed
modules included. A calibrated policy, which arrives after the model exists, is applied without
redefining any class::

  @functools.partial(jax.jit, static_argnames="policy")
  def train_step(state, batch, policy=None):
    with jact.use_policy(policy):       # None: each module's own bits
      ...

Policies are hashable, so passing the policy as a static argument retraces the step when it
changes; a `use_policy` around an already-traced jitted function has no effect on it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Sequence

import flax.linen as nn
from flax.core import lift

from jact import policies
from jact.transform import DEFAULT_GROUP_SIZE, DEFAULT_MIN_SIZE, remat_compress


@dataclasses.dataclass(frozen=True)
class Options:
  """How `compress` / `compressed` call `remat_compress`; shared by the linen and NNX paths.

  Attributes:
    policy: the region's own policy (`jact.use_policy` overrides it at trace time).
    static_argnums: positional arguments of the decorated function or method, counted as written
      (`self` is 0 for methods and module classes), that are passed as they are.
    group_size, min_size, rounding, kernel, recompute: as in `remat_compress`.
  """
  policy: policies.Policy
  static_argnums: tuple[int, ...] = ()
  group_size: int = DEFAULT_GROUP_SIZE
  min_size: int = DEFAULT_MIN_SIZE
  rounding: str = "stochastic"
  kernel: str = "auto"
  recompute: bool = False

  @classmethod
  def create(cls, bits: policies.BitsOrPolicy, static_argnums: int | Sequence[int], group_size: int,
             min_size: int, rounding: str, kernel: str = "auto", recompute: bool = False) -> "Options":
    static_argnums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
    return cls(policies.resolve(bits), static_argnums, group_size, min_size, rounding, kernel, recompute)

  def wrap(self, fun: Callable, *, name: str, num_state: int, positions: Sequence[int]) -> Callable:
    """`remat_compress` of `fun(*state, *args)`, with the `num_state` state arguments kept.

    Args:
      fun: the pure function; its first `num_state` arguments are variables (never compressed).
      name: the scope of residual names.
      num_state: how many leading arguments of `fun` are state.
      positions: for each later argument of `fun`, its position in the decorated callable, so
        that `static_argnums` (counted there) can be found among them.

    Returns:
      The wrapped function.
    """
    positions = list(positions)
    static = []
    for argnum in self.static_argnums:
      if argnum not in positions:
        raise ValueError(f"static_argnums={self.static_argnums} of {name!r}: argument {argnum} is "
                         f"not a positional argument of this call (it has positions {positions}; "
                         "a module itself is never static).")
      static.append(num_state + positions.index(argnum))
    return remat_compress(fun, self.policy, keep_argnums=tuple(range(num_state)),
                          static_argnums=tuple(static), group_size=self.group_size,
                          min_size=self.min_size, rounding=self.rounding, kernel=self.kernel,
                          recompute=self.recompute, name=name)


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


# --- linen ---------------------------------------------------------------------------------------

def _lifted_compress(fn: Callable, *, options: Options, method: Callable, default_name: str,
                     name: str | None) -> Callable:
  """The scope-level transform that `lift_transform` applies: `lift.pack` around remat_compress."""
  _, suffix = method_scope(method)

  def apply(scopes, *args, **kwargs):
    scope_name = name or (scopes[-1].name or default_name) + suffix  # the module's own scope is last
    positions = range(1, len(args) + 1)  # `self` is argument 0 of the method

    def packed(scope_fn, repack_fn, variable_groups, rng_groups, *args, **kwargs):
      def pure(variable_groups, rng_groups, *args, **kwargs):
        scope = scope_fn(variable_groups, rng_groups)
        return fn(scope, *args, **kwargs), repack_fn(scope)

      pure = with_arg_names(pure, ("variables", "rngs"), method, positions)
      return options.wrap(pure, name=scope_name, num_state=2, positions=positions)(
          variable_groups, rng_groups, *args, **kwargs)

    return lift.pack(packed, (True,), (True,), (True,), name="compress", enable_kwargs=True)(
        scopes, *args, **kwargs)

  return apply


def _is_linen_class(target: Any) -> bool:
  if isinstance(target, functools.partial):
    return _is_linen_class(target.func)
  return inspect.isclass(target) and issubclass(target, nn.Module)


def compressed(target: Any = None, bits: policies.BitsOrPolicy = 2, *,
               static_argnums: int | Sequence[int] = (), group_size: int = DEFAULT_GROUP_SIZE,
               min_size: int = DEFAULT_MIN_SIZE, rounding: str = "stochastic",
               kernel: str = "auto", recompute: bool = False,
               name: str | None = None) -> Any:
  """Lifted `remat_compress` for Flax linen: like `nn.remat`, residuals are stored compressed.

  Example::

    CBlock = jact.compressed(Block, bits=jact.policies.uniform(2))

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x, train: bool):
        for _ in range(4):
          x = CBlock()(x, train)        # variables at Net/Block_0, ... as without jact
        return x

  Args:
    target: a linen Module class (its `__call__` is compressed) or a method taking the module as
      its first argument (use as a decorator in the class body, above `@nn.compact`). Without
      it, returns a decorator.
    bits: an int width or a policy (see `remat_compress`); `jact.use_policy` overrides it.
    static_argnums: arguments passed as they are (flags such as `train`), counted as in
      `nn.remat`: `self` is argument 0.
    group_size, min_size, rounding, kernel, recompute: as in `remat_compress`.
    name: the module's component of residual names (default: the module's name, see the module
      docstring).

  Returns:
    A Module class with the same name and variable tree as `target`, or the wrapped method.
  """
  options = Options.create(bits, static_argnums, group_size, min_size, rounding, kernel, recompute)
  if target is None:
    return functools.partial(compressed, bits=bits, static_argnums=static_argnums,
                             group_size=group_size, min_size=min_size, rounding=rounding, kernel=kernel,
                             recompute=recompute, name=name)
  if _is_linen_class(target):
    module_class = target.func if isinstance(target, functools.partial) else target
    lifted = nn.transforms.lift_transform(_lifted_compress, target, options=options,
                                          method=module_class.__call__,
                                          default_name=module_class.__name__, name=name)
    lifted_class = lifted.func if isinstance(lifted, functools.partial) else lifted
    # Same class name, so that auto-named instances (Block_0) keep the uncompressed variable paths.
    lifted_class.__name__, lifted_class.__qualname__ = module_class.__name__, module_class.__qualname__
    return lifted
  if isinstance(target, nn.Module):
    raise TypeError(f"jact.compressed got a linen Module instance ({type(target).__name__}); pass "
                    f"the class (jact.compressed({type(target).__name__}, ...)) or decorate a method.")
  if not callable(target) or inspect.isclass(target):
    raise TypeError(f"jact.compressed expects a linen Module class or a method taking the module as "
                    f"its first argument, got {target!r}.")
  class_name, _ = method_scope(target)
  return nn.transforms.lift_transform(_lifted_compress, target, options=options, method=target,
                                      default_name=class_name or target.__name__, name=name)


# --- one decorator for linen, NNX and functions ------------------------------------------------

def compress(target: Any = None, bits: policies.BitsOrPolicy = 2, *,
             static_argnums: int | Sequence[int] = (), group_size: int = DEFAULT_GROUP_SIZE,
             min_size: int = DEFAULT_MIN_SIZE, rounding: str = "stochastic",
             kernel: str = "auto", recompute: bool = False, name: str | None = None) -> Any:
  """Compresses the residuals of a Flax module or a function; the decorator form of jact.

  Dispatches on what it decorates:

  * a linen Module class: `compressed(target)`, a class with the same name and variables;
  * a Flax NNX Module class or instance: `jact.nnx.compress(target)` (an instance is changed in
    place, see there);
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
    static_argnums: positional arguments passed as they are, counted as written (`self` is 0
      for methods and module classes).
    group_size, min_size, rounding, kernel, recompute: as in `remat_compress`.
    name: the scope of residual names (default: the module's name, the class name for NNX, the
      function's name).

  Returns:
    The compressed class, module, method or function.
  """
  from jact import nnx as jact_nnx  # jact.nnx builds on this module's Options

  kwargs = dict(bits=bits, static_argnums=static_argnums, group_size=group_size, min_size=min_size,
                rounding=rounding, kernel=kernel, recompute=recompute, name=name)
  if target is None:
    return functools.partial(compress, **kwargs)
  if _is_linen_class(target) or isinstance(target, nn.Module):
    return compressed(target, **kwargs)  # an instance: compressed explains what to pass instead
  if jact_nnx.is_module(target):
    return jact_nnx.compress(target, **kwargs)
  if not callable(target) or inspect.isclass(target):
    raise TypeError(f"jact.compress expects a linen Module class, a Flax NNX Module (class or "
                    f"instance), a method or a function; got {target!r} of type "
                    f"{type(target).__name__}.")
  linen_method = compressed(target, **kwargs)
  other = jact_nnx.compress_function(target, **kwargs)

  @functools.wraps(linen_method)  # carries Flax's method markers (compact, method_handler_wrapped)
  def dispatch(*args, **call_kwargs):
    if args and isinstance(args[0], nn.Module):
      return linen_method(*args, **call_kwargs)
    return other(*args, **call_kwargs)

  return dispatch
