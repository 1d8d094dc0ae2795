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
import math
from typing import Any, Callable, Mapping, Protocol, Union

from jact import codec
from jact.info import ResidualInfo, format_bytes


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


# --- calibrated policies (from jact.calibrate) -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CalibratedResidual:
  """One residual name of a calibrated policy (all traced residuals with that name together).

  Attributes:
    name: the residual name the policy matches.
    bits: the width chosen for it.
    occurrences: how many traced residuals share the name.
    nbytes: their full-precision bytes.
    group_size: the codec's group size for them.
    variance: predicted gradient variance contributed at each width of `codec.SUPPORTED_BITS`.
    shapes: their shapes.
    rebuilt_from: the residual it is rebuilt from (`ResidualInfo.rebuilt_from`, see
      jact.rewrites.affine): it costs no bytes and shares that residual's width.
  """
  name: str
  bits: int
  occurrences: int
  nbytes: int
  group_size: int
  variance: tuple[float, ...]
  shapes: tuple[tuple[int, ...], ...]
  dtype: str
  rebuilt_from: str = ""

  def variance_at(self, bits: int) -> float:
    return self.variance[codec.SUPPORTED_BITS.index(bits)]

  def stored_nbytes_at(self, bits: int) -> int:
    if self.rebuilt_from:
      return 0
    return sum(codec.stored_nbytes(s, self.dtype, bits, self.group_size) for s in self.shapes)

  @property
  def sensitivity(self) -> float:
    """Predicted gradient variance at 1 bit: how much this residual's noise matters."""
    return self.variance_at(1)


@dataclasses.dataclass(frozen=True)
class Calibrated:
  """A bit table from `jact.calibrate`: a policy (callable on ResidualInfo), serialisable.

  Residual names that are not in the table get `default` (32: kept as they are).
  """
  residuals: tuple[CalibratedResidual, ...]
  candidates: tuple[int, ...]
  budget_bytes: int
  method: str
  default: int = 32

  def __call__(self, info: ResidualInfo) -> int:
    return self.bits.get(info.name, self.default)

  @property
  def bits(self) -> dict[str, int]:
    return {r.name: r.bits for r in self.residuals}

  @property
  def predicted_variance(self) -> float:
    """Predicted gradient variance (sum over residuals) at the chosen widths."""
    return sum(r.variance_at(r.bits) for r in self.residuals)

  def predicted_variance_at(self, bits: int) -> float:
    """Predicted gradient variance if every residual were stored at `bits`."""
    return sum(r.variance_at(bits) for r in self.residuals)

  @property
  def stored_nbytes(self) -> int:
    return sum(r.stored_nbytes_at(r.bits) for r in self.residuals)

  @property
  def average_bits(self) -> float:
    """Over the residuals that are stored."""
    elements = sum(math.prod(s) for r in self.residuals if not r.rebuilt_from for s in r.shapes)
    return 8 * self.stored_nbytes / elements if elements else float("nan")

  def to_data(self) -> dict:
    return {"residuals": [dataclasses.asdict(r) for r in self.residuals], "candidates": list(self.candidates),
            "budget_bytes": self.budget_bytes, "method": self.method, "default": self.default}

  @classmethod
  def from_data(cls, data: dict) -> "Calibrated":
    residuals = tuple(CalibratedResidual(**{**r, "variance": tuple(r["variance"]),
                                            "shapes": tuple(tuple(s) for s in r["shapes"])})
                      for r in data["residuals"])
    return cls(residuals, tuple(data["candidates"]), data["budget_bytes"], data["method"], data["default"])

  def __str__(self) -> str:
    header = ("residual", "bits", "sensitivity", "variance", "bytes", "stored")
    rows = sorted(self.residuals, key=lambda r: -r.sensitivity)
    table = [(r.name, str(r.bits), f"{r.sensitivity:.3e}", f"{r.variance_at(r.bits):.3e}",
              format_bytes(r.nbytes), format_bytes(r.stored_nbytes_at(r.bits))) for r in rows]
    table.append(("total", f"{self.average_bits:.2f} avg", "", f"{self.predicted_variance:.3e}",
                  format_bytes(sum(r.nbytes for r in self.residuals)), format_bytes(self.stored_nbytes)))
    widths = [max(len(row[i]) for row in table + [header]) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
    title = (f"jact.policies.Calibrated: {len(self.residuals)} residual names, method={self.method}, "
             f"budget {format_bytes(self.budget_bytes)}")
    return "\n".join([title, line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in table])


_SERIALISABLE: dict[str, type] = {"uniform": Uniform, "by_name": ByName, "calibrated": Calibrated}


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
