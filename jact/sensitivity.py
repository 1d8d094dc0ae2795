"""How much each residual's quantisation disturbs the gradient, and the bits that minimise it.

The model (GACT's, made exact for jact's codec). The backward pass is linear in each residual, so
quantising residual r with stochastic rounding perturbs the gradient by J_r @ e_r, where
J_r = d(gradient)/d(r) and e_r is the rounding error: independent across elements, zero mean,
with variance sigma_e^2(b) = p_e (1 - p_e) step_e(b)^2 (`codec.rounding_variance`). Hence

    Var_r(b) = E ||J_r e_r||^2 = sum_e w_e sigma_e^2(b),    w_e = ||J_r[:, e]||^2,

and the total variance is the sum over residuals. Given the per-element weights w, the variance
at every bit width follows exactly from the residual's values.

Estimators of w (all on the probe batch passed to `calibrate`):
* "vjp" (default): Hutchinson. For a Rademacher vector u over the parameters, v = J^T u is one
  reverse pass through the backward pass, for every residual at once, and E[v_e^2] = w_e. Costs
  `num_probes` passes whatever the number of residuals.
* "jvp": per residual, the JVP of the gradient along Rademacher-signed codec noise at 2 bits
  gives Var_r(2) directly; other widths scale by the codec's noise ratio. One pass per residual and
  probe.
* "gact": GACT's estimator, for comparison: per residual, gradients with that residual quantised
  at 1 bit with two seeds and at 8 bits; C_r from their squared differences, Var_r(b) =
  C_r / (2^b - 1)^2. Three passes per residual.

References:
  Liu et al., "GACT: Activation Compressed Training for Generic Network Architectures", ICML 2022.
  Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1990.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jact import _context, codec, policies
from jact.info import ACTIVATION, INPUT, ResidualInfo, format_bytes

METHODS = ("vjp", "jvp", "gact")
DEFAULT_CANDIDATES = (1, 2, 4, 8, 16, 32)


# --- the calibrated policy -----------------------------------------------------------------------

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
  """
  name: str
  bits: int
  occurrences: int
  nbytes: int
  group_size: int
  variance: tuple[float, ...]
  shapes: tuple[tuple[int, ...], ...]
  dtype: str

  def variance_at(self, bits: int) -> float:
    return self.variance[codec.SUPPORTED_BITS.index(bits)]

  def stored_nbytes_at(self, bits: int) -> int:
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
    elements = sum(math.prod(s) for r in self.residuals for s in r.shapes)
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


policies.register_serialisable("calibrated", Calibrated)
policies.Calibrated = Calibrated


# --- the bit allocation --------------------------------------------------------------------------

def allocate(variance: np.ndarray, nbytes: np.ndarray, budget: float) -> np.ndarray:
  """Chooses one option per item minimising total variance with total bytes <= budget.

  A multiple-choice knapsack: `variance` and `nbytes` are (items, options). Greedy on each item's
  lower convex hull (the Lagrangian relaxation, optimal for the bytes it spends), then single-item
  improvements with the leftover budget. The result is within one item's step of the optimum:
  total variance <= optimum + max over items of the variance drop of one hull step.

  Returns:
    The chosen option index per item.
  """
  variance, nbytes = np.asarray(variance, float), np.asarray(nbytes, float)
  cheapest = nbytes.argmin(axis=1)
  if nbytes[np.arange(len(nbytes)), cheapest].sum() > budget:
    raise ValueError(f"the budget of {budget:.0f} bytes is below the smallest possible "
                     f"({nbytes.min(axis=1).sum():.0f} bytes with every residual at its narrowest width).")
  hulls = [_lower_hull(v, b) for v, b in zip(variance, nbytes)]
  position = [0] * len(hulls)
  choice = np.array([h[0] for h in hulls])
  spent = nbytes[np.arange(len(choice)), choice].sum()
  while True:  # take the upgrade with the best variance saved per byte that still fits
    best, best_rate = None, 0.0
    for i, hull in enumerate(hulls):
      if position[i] + 1 < len(hull):
        a, b = hull[position[i]], hull[position[i] + 1]
        extra = nbytes[i, b] - nbytes[i, a]
        rate = (variance[i, a] - variance[i, b]) / extra
        if spent + extra <= budget and rate > best_rate:
          best, best_rate = i, rate
    if best is None:
      break
    position[best] += 1
    new = hulls[best][position[best]]
    spent += nbytes[best, new] - nbytes[best, choice[best]]
    choice[best] = new
  improved = True
  while improved:  # spend what is left on the single change that saves most
    improved = False
    gains = [(variance[i, choice[i]] - variance[i, j], i, j) for i in range(len(choice))
             for j in range(variance.shape[1])
             if spent - nbytes[i, choice[i]] + nbytes[i, j] <= budget and variance[i, j] < variance[i, choice[i]]]
    if gains:
      _, i, j = max(gains)
      spent += nbytes[i, j] - nbytes[i, choice[i]]
      choice[i] = j
      improved = True
  return choice


def _lower_hull(variance: np.ndarray, nbytes: np.ndarray) -> list[int]:
  """Options on the lower-left convex hull of (bytes, variance), by increasing bytes."""
  order = sorted(range(len(nbytes)), key=lambda j: (nbytes[j], variance[j]))
  hull: list[int] = []
  for j in order:
    if hull and variance[j] >= variance[hull[-1]]:
      continue  # dominated: more bytes, no less variance
    while len(hull) >= 2:
      a, b = hull[-2], hull[-1]
      # drop b if it lies on or above the segment a -> j
      if (variance[b] - variance[a]) * (nbytes[j] - nbytes[a]) >= (variance[j] - variance[a]) * (nbytes[b] - nbytes[a]):
        hull.pop()
      else:
        break
    hull.append(j)
  return hull


# --- the estimators -------------------------------------------------------------------------------

Key = tuple[str, int]  # residual name, occurrence


class _Probed:
  """`loss_fn` differentiated with every compressed residual kept exact and perturbable."""

  def __init__(self, loss_fn: Callable, args: Sequence[Any], kwargs: dict, argnums: int, has_aux: bool):
    self.args, self.kwargs, self.argnums = list(args), kwargs, argnums

    def gradient(deltas: dict, *args):
      probe = _context.Probe(deltas=deltas)

      def loss(*args):
        out = loss_fn(*args, **kwargs)
        return (out[0] if has_aux else out), dict(probe.captured)

      with _context.probing(probe):
        return jax.grad(loss, argnums=argnums, has_aux=True)(*args)

    self.gradient = gradient
    with _context.collecting() as regions:
      _, captured = jax.eval_shape(gradient, {}, *args)
    self.keys: list[Key] = list(captured)
    if not self.keys:
      raise ValueError("calibrate found no compressible residual: differentiating loss_fn reaches no "
                       "jact.remat_compress call (or compressed Flax module) with activations to compress.")
    infos = {}
    for info in (i for region in regions for i in region):
      if info.kept_because == "" and info.source in (ACTIVATION, INPUT):
        infos.setdefault(info.name, info)
    self.infos = infos
    self.values: dict[Key, jax.Array] = jax.jit(lambda *a: gradient({}, *a)[1])(*args)

  def zeros(self) -> dict:
    return {k: jnp.zeros_like(v) for k, v in self.values.items()}

  def rounding_variance(self, key: Key, bits: int) -> jax.Array:
    return codec.rounding_variance(self.values[key], bits, self.infos[key[0]].group_size)


def _variance_vjp(probed: _Probed, num_probes: int, rng: jax.Array, progress: bool) -> dict[Key, np.ndarray]:
  zeros = probed.zeros()

  @jax.jit
  def squared_sensitivity(key):
    grads, pullback = jax.vjp(lambda d: probed.gradient(d, *probed.args)[0], zeros)
    leaves, tree = jax.tree.flatten(grads)
    keys = jax.random.split(key, len(leaves))
    signs = [jax.random.rademacher(k, g.shape, g.dtype) for k, g in zip(keys, leaves)]
    (v,) = pullback(jax.tree.unflatten(tree, signs))
    return {k: x.astype(jnp.float32) ** 2 for k, x in v.items()}

  weights = {k: 0.0 for k in zeros}
  for key in tqdm(jax.random.split(rng, num_probes), desc="calibrate (vjp probes)", disable=not progress or None, leave=False):
    weights = jax.tree.map(lambda acc, w: acc + w / num_probes, weights, squared_sensitivity(key))
  return {k: np.array([float(jnp.sum(weights[k] * probed.rounding_variance(k, b))) for b in codec.SUPPORTED_BITS])
          for k in zeros}


def _variance_jvp(probed: _Probed, num_probes: int, rng: jax.Array, progress: bool) -> dict[Key, np.ndarray]:
  zeros = probed.zeros()
  tangent_grad = jax.jit(lambda t: jax.jvp(lambda d: probed.gradient(d, *probed.args)[0], (zeros,), (t,))[1])
  reference = 2
  out = {}
  for index, key in enumerate(tqdm(list(zeros), desc="calibrate (jvp per residual)", disable=not progress or None, leave=False)):
    sigma = jnp.sqrt(probed.rounding_variance(key, reference))
    total = 0.0
    for k in jax.random.split(jax.random.fold_in(rng, index), num_probes):
      tangent = dict(zeros)
      tangent[key] = (jax.random.rademacher(k, sigma.shape, jnp.float32) * sigma).astype(zeros[key].dtype)
      total += sum(float(jnp.sum(g.astype(jnp.float32) ** 2)) for g in jax.tree.leaves(tangent_grad(tangent))) / num_probes
    noise = np.array([float(jnp.sum(probed.rounding_variance(key, b))) for b in codec.SUPPORTED_BITS])
    ref_noise = noise[codec.SUPPORTED_BITS.index(reference)]
    out[key] = total * noise / ref_noise if ref_noise > 0 else np.zeros(len(noise))
  return out


def _variance_gact(probed: _Probed, seed: int, progress: bool) -> dict[Key, np.ndarray]:
  zeros = probed.zeros()
  grad_with = jax.jit(lambda d: probed.gradient(d, *probed.args)[0])
  seeds = np.random.default_rng(seed).integers(0, 2**31, size=(len(zeros), 3))
  out = {}
  for index, key in enumerate(tqdm(list(zeros), desc="calibrate (gact, 3 passes per residual)", disable=not progress or None, leave=False)):
    value, group_size = probed.values[key], probed.infos[key[0]].group_size
    grads = [grad_with({**zeros, key: codec.dequantize(codec.quantize(value, bits, group_size, seed=int(s))) - value})
             for bits, s in zip((1, 1, 8), seeds[index])]
    c = (_squared_distance(grads[0], grads[2]) + _squared_distance(grads[1], grads[2])) / 2
    out[key] = np.array([c / (2**b - 1) ** 2 if b <= 8 else 0.0 for b in codec.SUPPORTED_BITS])
  return out


def _squared_distance(a, b) -> float:
  return sum(float(jnp.sum((x - y).astype(jnp.float32) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --- calibrate -----------------------------------------------------------------------------------

def calibrate(loss_fn: Callable, *args: Any, avg_bits: float | None = None, budget_bytes: int | None = None,
              candidates: Sequence[int] = DEFAULT_CANDIDATES, method: str = "vjp", num_probes: int = 8,
              argnums: int = 0, has_aux: bool = False, seed: int = 0, progress: bool = True,
              **kwargs: Any) -> Calibrated:
  """Chooses each residual's bit width from its measured effect on the gradient, under a budget.

  Runs on a probe batch (a slice of a training batch is enough): the compressed calls inside
  `loss_fn` keep their residuals exact while the sensitivity of the gradient of `loss_fn` (with
  respect to `args[argnums]`) to each residual's rounding noise is measured; then the widths that
  minimise the predicted gradient variance within the budget are chosen (see `allocate`).

  Nothing global changes: no RNG state, no model state (a `loss_fn` that returns updated
  BatchNorm statistics as aux has them discarded), and the compressed calls keep their own
  policies outside this function. Apply the result with `bits=policy` or `jact.use_policy(policy)`.

  Args:
    loss_fn: returns a scalar loss (or `(loss, aux)` with `has_aux=True`).
    *args, **kwargs: its arguments, with the probe batch.
    avg_bits: budget as an average width: the bytes of every residual at `avg_bits` per value
      plus the codec's per-group metadata. Give this or `budget_bytes`.
    budget_bytes: budget in stored bytes, metadata included.
    candidates: the widths to choose from, a subset of (1, 2, 4, 8, 16, 32).
    method: "vjp" (default: a few reverse passes for all residuals), "jvp" (one forward-mode
      pass per residual and probe) or "gact" (GACT's estimator: three gradients per residual).
    num_probes: random probes for "vjp" and "jvp".
    argnums: which argument the gradient is taken with respect to (the parameters).
    has_aux: `loss_fn` returns `(loss, aux)`.
    seed: seeds the probes.
    progress: show a progress bar.

  Returns:
    A `jact.policies.Calibrated` policy.
  """
  if (avg_bits is None) == (budget_bytes is None):
    raise ValueError("give exactly one of avg_bits= (an average width, e.g. 2.0) or budget_bytes=.")
  candidates = tuple(sorted({codec.check_bits(b, what="candidates entry") for b in candidates}))
  if method not in METHODS:
    raise ValueError(f"method={method!r} is not supported; use one of {METHODS}.")
  if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
    raise ValueError(f"num_probes={num_probes!r} must be a positive int.")
  if avg_bits is not None and not 0 < avg_bits <= 32:
    raise ValueError(f"avg_bits={avg_bits!r} must be in (0, 32].")
  probed = _Probed(loss_fn, args, kwargs, argnums, has_aux)
  rng = jax.random.key(seed)
  if method == "vjp":
    per_key = _variance_vjp(probed, num_probes, rng, progress)
  elif method == "jvp":
    per_key = _variance_jvp(probed, num_probes, rng, progress)
  else:
    per_key = _variance_gact(probed, seed, progress)

  names = list(dict.fromkeys(name for name, _ in per_key))
  variance = {n: sum(v for (name, _), v in per_key.items() if name == n) for n in names}
  shapes = {n: tuple(tuple(probed.values[k].shape) for k in per_key if k[0] == n) for n in names}
  rows = []
  for n in names:
    info = probed.infos[n]
    rows.append(CalibratedResidual(n, 32, len(shapes[n]), sum(math.prod(s) for s in shapes[n]) * info.dtype.itemsize,
                                   info.group_size, tuple(float(v) for v in variance[n]), shapes[n], info.dtype.name))
  if budget_bytes is None:
    budget_bytes = int(sum(math.prod(s) * avg_bits / 8 + 4 * codec.Layout.of(s, r.group_size).num_groups
                           for r in rows for s in r.shapes))
  var_matrix = np.array([[r.variance_at(b) for b in candidates] for r in rows])
  byte_matrix = np.array([[r.stored_nbytes_at(b) for b in candidates] for r in rows])
  choice = allocate(var_matrix, byte_matrix, budget_bytes)
  rows = tuple(dataclasses.replace(r, bits=candidates[c]) for r, c in zip(rows, choice))
  return Calibrated(rows, candidates, int(budget_bytes), method)
