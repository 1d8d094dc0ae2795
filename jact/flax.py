"""Flax linen integration: `compressed`, a lifted transform like `nn.remat`.

`compressed(Block, bits=...)` is to `remat_compress` what `nn.remat(Block)` is to
`jax.checkpoint`: one application of Flax's own lifting (`lift_transform` over `lift.pack`), so
variables, RNG streams, mutable collections and nesting (`nn.scan`, `nn.remat`, `nn.jit`) work as
they do for every linen transform. `jact.compress` (`jact.decorator`) is the one decorator for
everything: a linen Module class, a linen method, a Flax NNX module (see `jact.nnx`) or a plain
function.

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

import functools
import inspect
from typing import Any, Callable

import flax.linen as nn
from flax.core import lift

from jact import _options, _wrapping, policies
from jact._options import Options


def _lifted_compress(fn: Callable, *, options: Options, method: Callable, default_name: str,
                     name: str | None) -> Callable:
  """The scope-level transform that `lift_transform` applies: `lift.pack` around remat_compress."""
  _, suffix = _wrapping.method_scope(method)

  def apply(scopes, *args, **kwargs):
    scope_name = name or (scopes[-1].name or default_name) + suffix  # the module's own scope is last
    positions = range(1, len(args) + 1)  # `self` is argument 0 of the method

    def packed(scope_fn, repack_fn, variable_groups, rng_groups, *args, **kwargs):
      def pure(variable_groups, rng_groups, *args, **kwargs):
        scope = scope_fn(variable_groups, rng_groups)
        return fn(scope, *args, **kwargs), repack_fn(scope)

      pure = _wrapping.with_arg_names(pure, ("variables", "rngs"), method, positions)
      return _wrapping.wrap(options, pure, name=scope_name, num_state=2, positions=positions,
                            numbered=False)(  # the module path is distinct already
          variable_groups, rng_groups, *args, **kwargs)

    return lift.pack(packed, (True,), (True,), (True,), name="compress", enable_kwargs=True)(
        scopes, *args, **kwargs)

  return apply


def is_linen_class(target: Any) -> bool:
  """Whether `target` is a linen Module class (or a partial of one)."""
  if isinstance(target, functools.partial):
    return is_linen_class(target.func)
  return inspect.isclass(target) and issubclass(target, nn.Module)


LINEN_NOTES = {
    "static_argnums": "arguments passed as they are (flags such as `train`), counted as in "
                      "`nn.remat`: `self` is argument 0.",
    "name": "the module's component of residual names (default: the module's name, see the "
            "module docstring).",
}


@_options.takes_options(excluded=("keep_argnums",), notes=LINEN_NOTES)
def compressed(target: Any = None, bits: policies.BitsOrPolicy = 2, **options: Any) -> Any:
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
    {options}

  Returns:
    A Module class with the same name and variable tree as `target`, or the wrapped method.
  """
  checked = Options.create(bits, entry="jact.compressed", excluded=("keep_argnums",), **options)
  if target is None:
    return functools.partial(compressed, **checked.user_options(excluded=("keep_argnums",)))
  return compressed_with(target, checked)


def compressed_with(target: Any, options: Options) -> Any:
  """`compressed(target, ...)` with its options already checked."""
  name = options.name
  if is_linen_class(target):
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
  class_name, _ = _wrapping.method_scope(target)
  return nn.transforms.lift_transform(_lifted_compress, target, options=options, method=target,
                                      default_name=class_name or target.__name__, name=name)
