"""Bit policies: which width each residual is stored at.

A policy is any callable `policy(info: jact.ResidualInfo) -> int | None` returning one of
1, 2, 4, 8, 16 or 32 (None means 32: keep as is). jact asks it only about residuals that may be
compressed (activations and inputs of the wrapped function, floating point, at least `min_size`
elements); parameters, constants and small or integer residuals are always kept.

The policies here are frozen dataclasses: printable, comparable, hashable (so a change of policy
retraces a jitted function) and serialisable with `to_json` / `from_json`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from typing import Any, Callable, Mapping, Protocol, Union

from jact import codec
from jact.info import ResidualInfo


class Policy(Protocol):
  def __call__(self, info: ResidualInfo) -> int | None: ...


BitsOrPolicy = Union[int, None, Policy, Callable[[ResidualInfo], Union[int, None]]]


@dataclasses.dataclass(frozen=True)
class Uniform:
  """Every compressible residual at the same width."""
  bits: int

  def __post_init__(self):
    codec.check_bits(self.bits)

  def __call__(self, info: ResidualInfo) -> int:
    return self.bits


@dataclasses.dataclass(frozen=True)
class ByName:
  """Widths chosen by glob patterns over residual names; the first matching pattern wins.

  Names look like `layer/dot_general0` or `Net/Block_3/Dense_0/x` (see `ResidualInfo.name`).
  A residual that no pattern matches gets `default`.
  """
  rules: tuple[tuple[str, int], ...]
  default: int = 32

  def __post_init__(self):
    for pattern, bits in self.rules:
      if not isinstance(pattern, str):
        raise TypeError(f"by_name patterns must be strings, got {pattern!r}.")
      codec.check_bits(bits, what=f"bits for pattern {pattern!r}")
    codec.check_bits(self.default, what="default")

  def __call__(self, info: ResidualInfo) -> int:
    for pattern, bits in self.rules:
      if fnmatch.fnmatchcase(info.name, pattern):
        return bits
    return self.default


def uniform(bits: int) -> Uniform:
  """A policy storing every compressible residual at `bits` (1, 2, 4, 8, 16 or 32)."""
  return Uniform(codec.check_bits(bits))


def by_name(rules: Mapping[str, int], default: int = 32) -> ByName:
  """A policy from glob patterns over residual names, in order: `{"*attention*": 8, "*": 2}`.

  Args:
    rules: pattern -> bits; the first pattern that matches a residual's name decides.
    default: bits for residuals no pattern matches (32: keep them).
  """
  if not isinstance(rules, Mapping):
    raise TypeError(f"by_name expects a mapping of glob pattern -> bits, got {type(rules).__name__}.")
  return ByName(tuple((p, codec.check_bits(b, what=f"bits for pattern {p!r}")) for p, b in rules.items()),
                codec.check_bits(default, what="default"))


def resolve(bits: BitsOrPolicy) -> Policy:
  """An int (or None) becomes a uniform policy; a callable is used as it is."""
  if bits is None or isinstance(bits, int) and not isinstance(bits, bool):
    return uniform(codec.check_bits(bits))
  if callable(bits):
    return bits
  raise TypeError(f"bits must be one of {codec.SUPPORTED_BITS}, None, or a policy "
                  f"(a callable ResidualInfo -> bits such as jact.policies.uniform(4)); got {bits!r}.")


_SERIALISABLE: dict[str, type] = {"uniform": Uniform, "by_name": ByName}


def register_serialisable(kind: str, cls: type) -> type:
  """Makes a dataclass policy known to `from_json` under `kind`."""
  _SERIALISABLE[kind] = cls
  return cls


def to_json(policy: Policy) -> str:
  """Serialises a policy from this module (or one registered with `register_serialisable`)."""
  for kind, cls in _SERIALISABLE.items():
    if type(policy) is cls:
      return json.dumps({"kind": kind, **_to_data(policy)})
  raise TypeError(f"{type(policy).__name__} is not a serialisable jact policy; "
                  f"known kinds: {sorted(_SERIALISABLE)}.")


def from_json(text: str) -> Policy:
  data = json.loads(text)
  kind = data.pop("kind", None)
  if kind not in _SERIALISABLE:
    raise ValueError(f"unknown policy kind {kind!r}; known kinds: {sorted(_SERIALISABLE)}.")
  cls = _SERIALISABLE[kind]
  if hasattr(cls, "from_data"):
    return cls.from_data(data)
  if kind == "by_name":
    data["rules"] = tuple((p, b) for p, b in data["rules"])
  return cls(**data)


def _to_data(policy: Any) -> dict:
  if hasattr(policy, "to_data"):
    return policy.to_data()
  return dataclasses.asdict(policy)
