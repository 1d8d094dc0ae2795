"""The options of every compressed entry point, in one place.

`remat_compress`, `jact.compressed` (linen), `jact.compress`, `jact.nnx.compress` and the rules
that calibration probes all take the same options and hand one `Options` object down. Adding an
option means adding a field (with its line in `OPTION_DOCS`) here: every entry point's signature
and docstring are built from them (`takes_options`).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Sequence

import numpy as np

from jact import codec, policies, quantization

DEFAULT_GROUP_SIZE = 256
DEFAULT_MIN_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class Options:
  """How a compressed function stores its residuals (see `OPTION_DOCS` for each field).

  Not user options: `compress_nonlinear` is set for the outer call of `recompute=True`, which
  stores the inputs of a recomputation although the recomputation uses them nonlinearly;
  `numbered` (repeated calls get distinct scopes, see `jact._naming`) is on unless the user named
  the call or the name is already distinct (a linen module's path); `name_from_caller` makes
  the recomputed call of `recompute=True` take the scope of the call that stores its inputs.
  """
  policy: policies.Policy = dataclasses.field(default_factory=lambda: policies.uniform(2))
  keep_argnums: tuple[int, ...] = ()
  static_argnums: tuple[int, ...] = ()
  group_size: int = DEFAULT_GROUP_SIZE
  min_size: int = DEFAULT_MIN_SIZE
  rounding: str = "stochastic"
  kernel: str = "auto"
  recompute: bool = False
  name: str | None = None
  compress_nonlinear: bool = False
  numbered: bool = True
  name_from_caller: bool = False

  @classmethod
  def create(cls, bits: policies.BitsOrPolicy = 2, *, entry: str = "remat_compress",
             excluded: Sequence[str] = (), **options: Any) -> "Options":
    """Checks user options and returns them as `Options`.

    Args:
      bits: an int width or a policy.
      entry: the public function the options were given to (for error messages).
      excluded: options that `entry` does not take.
      **options: any of `OPTION_DOCS`.
    """
    accepted = [k for k in OPTION_DOCS if k not in excluded]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
      raise TypeError(f"{entry} got unexpected option(s) {', '.join(unknown)}; it accepts bits and "
                      f"{', '.join(accepted)}.")
    defaults = cls()
    value = lambda k: options.get(k, getattr(defaults, k))
    min_size = value("min_size")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
      raise ValueError(f"min_size={min_size!r} must be a non-negative int (a number of elements).")
    name = value("name")
    if name is not None and not isinstance(name, str):
      raise TypeError(f"name={name!r} must be a string or None.")
    return cls(policy=policies.resolve(bits),
               keep_argnums=check_argnums(value("keep_argnums"), "keep_argnums"),
               static_argnums=check_argnums(value("static_argnums"), "static_argnums"),
               group_size=codec.check_group_size(value("group_size")),
               min_size=int(min_size),
               rounding=codec.check_rounding(value("rounding")),
               kernel=quantization.check_kernel(value("kernel")),
               recompute=bool(value("recompute")),
               name=name,
               numbered=name is None)

  def user_options(self, excluded: Sequence[str] = ()) -> dict[str, Any]:
    """The options as keyword arguments of an entry point (`bits` for the policy)."""
    return {"bits": self.policy, **{k: getattr(self, k) for k in OPTION_DOCS if k not in excluded}}


# Each user option and its documentation, in the order of the signatures.
OPTION_DOCS = {
    "keep_argnums": "positional arguments never compressed (parameters).",
    "static_argnums": "positional arguments that are not arrays (flags, modules), passed as they are.",
    "group_size": "elements sharing one scale; a positive multiple of 64.",
    "min_size": "residuals with fewer elements are kept as they are (in a loop compressed step by "
                "step, a body's residual counts with all the steps the loop keeps it for).",
    "rounding": '"stochastic" (unbiased) or "nearest".',
    "kernel": 'the codec\'s implementation: "auto" (fused Pallas kernels on GPU, jax.numpy '
              'elsewhere), "pallas" or "xla"; see `jact.quantize`.',
    "recompute": "store only the (compressed) inputs and recompute the function in the backward pass.",
    "name": "the scope of residual names (default: the function's or module's name).",
}


def check_argnums(argnums: Any, what: str) -> tuple[int, ...]:
  """`argnums` as a tuple of non-negative ints, or a ValueError naming `what`."""
  argnums = (argnums,) if isinstance(argnums, (int, np.integer)) else tuple(argnums)
  for a in argnums:
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or a < 0:
      raise ValueError(f"{what} must be non-negative ints, got {argnums!r}.")
  return tuple(int(a) for a in argnums)


def takes_options(*, excluded: Sequence[str] = (), notes: dict[str, str] | None = None) -> Callable:
  """Gives an entry point `f(target=None, bits=2, **options)` a signature that lists each option
  as a keyword argument, and documents them where its docstring says `{options}`.

  Args:
    excluded: options the entry point does not take.
    notes: text that replaces an option's documentation for this entry point.
  """
  notes = notes or {}

  def decorate(fun: Callable) -> Callable:
    defaults = Options()
    signature = inspect.signature(fun)
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=getattr(defaults, k))
               for k in OPTION_DOCS if k not in excluded]
    fun.__signature__ = signature.replace(parameters=params)
    lines = []
    for k in OPTION_DOCS:
      if k not in excluded:
        lines.append(f"    {k}: {notes.get(k, OPTION_DOCS[k])}")
    if fun.__doc__ and "{options}" in fun.__doc__:
      fun.__doc__ = fun.__doc__.replace("    {options}", "\n".join(lines))
    return fun

  return decorate
