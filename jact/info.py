"""ResidualInfo: what jact knows about one residual, and the table that lists them."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import jax
import numpy as np

from jact import codec

class Source(enum.StrEnum):
  """Where a residual comes from. Only activations and inputs are ever compressed."""
  ACTIVATION = "activation"  # computed inside the wrapped function from its compressible inputs
  INPUT = "input"            # one of the wrapped function's own arguments
  INDEX = "index"            # computed from integer/boolean inputs (indices, masks) and parameters only
  PARAMETER = "parameter"    # an argument in keep_argnums, a closed-over value, or computed from those only
  CONSTANT = "constant"      # depends on no argument at all (XLA rebuilds it for free)


# Sources that the backward pass recomputes from inputs that are alive anyway rather than storing.
RECOMPUTABLE = frozenset({Source.INDEX, Source.PARAMETER, Source.CONSTANT})


class Kept(enum.StrEnum):
  """Why a residual the policy was not asked about is kept as it is (`ResidualInfo.kept_because`;
  a recomputable one gives its `Source`, one below `min_size` says so with the threshold)."""
  NOT_FLOATING = "not floating point"
  NONLINEAR = "nonlinear in backward"
  PER_ROW = "per-row statistic"
  NESTED = "stored by a nested compressed call"


@dataclasses.dataclass(frozen=True)
class ResidualInfo:
  """One value that the forward pass hands to the backward pass.

  Attributes:
    name: stable, readable name: `<scope>/<label>`, where the scope is the wrapped function's name
      (or the Flax module path) and the label is the argument's name or the primitive that
      produced the value, numbered per primitive (`dot_general0`, `tanh1`).
    shape, dtype: of the full-precision residual.
    source: a `Source` (a string).
    is_argument: the residual is one of the wrapped function's inputs (identity, not a copy).
    primitive: the primitive that produced it (None for arguments).
    bits: the stored width (32: kept as is).
    group_size: the codec's group size.
    kept_because: why it is not compressed, when the policy was not asked ("" otherwise).
    recomputed: a value of parameters, constants and index inputs alone (a weight's layout, a
      dropout mask, a graph's edges cut into chunks), rebuilt in the backward pass rather than
      stored. (A value computed in a loop over activations is stored, and so is a value of index
      inputs smaller than the inputs it would keep alive.)
    two_valued: provably takes at most two values that 1-bit codes represent exactly (a ReLU's
      derivative, a scaled dropout mask); compressed, it is stored at 1 bit whatever the policy's
      width, without error.
    rebuilt_from: the name of another residual of the same call that this one is an affine
      function of (`2 * x` and `x - mean`, say): only that one is stored, and this one is rebuilt
      from its decoded value in the backward pass (see `jact.rewrites.affine`).
    extra_nbytes: for a rebuilt residual, the bytes of the small values (a mean, say) stored at
      full precision for rebuilding it.
    stacked_by_loop: computed inside a `lax.scan` and stacked over its steps by the loop itself,
      at full precision, before jact can compress it: the peak falls little or not at all. jact
      compresses such loops step by step; only a loop it leaves as it is (one with effects, or
      whose body keeps every residual) keeps compressed residuals like this.
    loop_steps: for a residual of a loop's body compressed step by step, the steps of the loop
      (of each loop, outermost first, for nested loops): its shape leads with them, and it is
      quantised step by step (empty elsewhere).
  """
  name: str
  shape: tuple[int, ...]
  dtype: Any
  source: str
  is_argument: bool = False
  primitive: str | None = None
  bits: int = 32
  group_size: int = 256
  kept_because: str = ""
  recomputed: bool = False
  two_valued: bool = False
  rebuilt_from: str = ""
  extra_nbytes: int = 0
  stacked_by_loop: bool = False
  loop_steps: tuple[int, ...] = ()

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes of the full-precision residual."""
    return self.size * itemsize(self.dtype)

  @property
  def stored_nbytes(self) -> int:
    """Bytes jact stores for it at `bits` (payload plus per-group metadata)."""
    if self.loop_steps:  # quantised step by step
      step = dataclasses.replace(self, shape=self.shape[len(self.loop_steps):], loop_steps=())
      return math.prod(self.loop_steps) * step.stored_nbytes
    if self.recomputed:
      return 0
    if self.rebuilt_from:
      return self.extra_nbytes
    if self.bits == 32:
      return self.nbytes
    return codec.stored_nbytes(self.shape, self.dtype, self.bits, self.group_size)

  @property
  def compressed(self) -> bool:
    return self.bits != 32

  @property
  def sized_by_policy(self) -> bool:
    """An activation or input whose width the policy chose (none kept it for a reason): what
    `jact.calibrate` probes and sizes."""
    return self.kept_because == "" and self.source in (Source.ACTIVATION, Source.INPUT)


def aval_nbytes(aval) -> int:
  return math.prod(aval.shape) * itemsize(aval.dtype)


def itemsize(dtype) -> int:
  """Bytes per element, typed PRNG keys included (their key data)."""
  if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), dtype))
    return math.prod(data.shape) * data.dtype.itemsize
  return np.dtype(dtype).itemsize


def format_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  raise AssertionError("unreachable")


def _how_stored(r: ResidualInfo) -> str:
  """The table's note after a residual's source: why it is not stored compressed as usual, and
  the loop steps it is stored over."""
  notes = [_why_not_as_usual(r)] if _why_not_as_usual(r) else []
  if r.loop_steps:
    notes.append(f"in a loop, {' x '.join(map(str, r.loop_steps))} steps")
  return f" ({'; '.join(notes)})" if notes else ""


def _why_not_as_usual(r: ResidualInfo) -> str:
  if r.recomputed:
    return "recomputed"
  if r.rebuilt_from:
    return f"from {r.rebuilt_from.rsplit('/', 1)[-1]}"
  if r.kept_because not in ("", r.source):
    return r.kept_because
  if r.stacked_by_loop and r.compressed:
    return "stacked by a loop"
  return "two values: exact" if r.two_valued and r.compressed else ""


class ResidualTable(list):
  """A list of ResidualInfo that prints as a table, with totals."""

  @property
  def nbytes(self) -> int:
    return sum(r.nbytes for r in self)

  @property
  def stored_nbytes(self) -> int:
    return sum(r.stored_nbytes for r in self)

  def activation_nbytes(self, stored: bool = False) -> int:
    """Bytes of compressible residuals (activations and inputs), full or as stored."""
    return sum(r.stored_nbytes if stored else r.nbytes for r in self if r.source in (Source.ACTIVATION, Source.INPUT, Source.INDEX))

  def __str__(self) -> str:
    header = ("name", "shape", "dtype", "source", "bits", "bytes", "stored")
    rows = [(r.name, "x".join(map(str, r.shape)) or "()", str(r.dtype), r.source + _how_stored(r), str(r.bits),
             format_bytes(r.nbytes), format_bytes(r.stored_nbytes)) for r in self]
    ratio = self.nbytes / self.stored_nbytes if self.stored_nbytes else float("nan")
    rows.append(("total", "", "", f"{len(self)} residuals", "", format_bytes(self.nbytes),
                 f"{format_bytes(self.stored_nbytes)} ({ratio:.1f}x less)"))
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
    return "\n".join([line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])

  def __repr__(self) -> str:
    return f"ResidualTable({len(self)} residuals, {format_bytes(self.nbytes)} -> {format_bytes(self.stored_nbytes)})"
