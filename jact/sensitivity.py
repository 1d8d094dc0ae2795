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
  one linearisation of the gradient and `num_probes` passes through its transpose, whatever the
  number of residuals.
* "jvp": per residual, the JVP of the gradient along Rademacher-signed codec noise at 2 bits
  gives Var_r(2) directly; other widths scale by the codec's noise ratio. One linearisation, then
  `num_probes` forward-mode passes per residual.
* "gact": GACT's estimator, for comparison: per residual, gradients with that residual quantised
  at 1 bit with two seeds and at 8 bits; C_r from their squared differences, Var_r(b) =
  C_r / (2^b - 1)^2. Three gradients per residual (one compiled call, which shares their forward
  pass).

Every estimator compiles its passes once, with the arguments as inputs (not constants), so
calibrating again on arguments of the same shapes (`jact.Recalibration`) reuses the compilation.

References:
  Liu et al., "GACT: Activation Compressed Training for Generic Network Architectures", ICML 2022.
  Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1990.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jact import _context, _naming, codec
from jact.info import ResidualInfo
from jact.policies import Calibrated, CalibratedResidual

DEFAULT_CANDIDATES = (1, 2, 4, 8, 16, 32)


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
Groups = tuple[tuple[Key, int], ...]  # each residual's codec group size


class _Probed:
  """`loss_fn`'s gradient with every compressed residual kept exact, reported and perturbable.

  The arguments (parameters, probe batch) are arguments of every compiled function here, never
  constants baked into them: a later calibration on new arguments of the same shapes (see
  `jact.Recalibration`) reuses the compilations.
  """

  def __init__(self, loss_fn: Callable, kwargs: dict, argnums: int, has_aux: bool):
    def gradient(deltas: dict, *args):
      probe = _context.Probe(deltas=deltas)

      def loss(*args):
        out = loss_fn(*args, **kwargs)
        return (out[0] if has_aux else out), dict(probe.captured)

      # Numbered from the start at each probed gradient, as the estimators evaluate several in one program.
      with _context.probing(probe), _naming.counting_calls():
        return jax.grad(loss, argnums=argnums, has_aux=True)(*args)

    self.gradient = gradient
    self._values = jax.jit(lambda args: gradient({}, *args)[1])
    # XLA:CPU's default optimisation level compiles these second-order programs twice as long for
    # no faster run (ResNet-18: 23 -> 12 CPU seconds); other backends keep their defaults.
    second_order = {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else None
    self.vjp_probes = jax.jit(functools.partial(_vjp_probes, gradient), compiler_options=second_order)
    self.jvp_probes = jax.jit(functools.partial(_jvp_probes, gradient), compiler_options=second_order)
    self.gact_probe = jax.jit(functools.partial(_gact_probe, gradient))

  def residuals(self, args: Sequence[Any]) -> tuple[dict[Key, jax.Array], dict[str, ResidualInfo]]:
    """The exact value of each compressible residual on `args`, and each residual name's description."""
    with _context.collecting() as regions:  # a fresh function, so that it is traced, not served from a cache
      _, captured = jax.eval_shape(lambda *a: self.gradient({}, *a), *args)
    if not captured:
      raise ValueError("calibrate found no compressible residual: differentiating loss_fn reaches no "
                       "jact.remat_compress call (or compressed Flax module) with activations to compress.")
    infos = {}
    for info in (i for region in regions for i in region):
      if info.sized_by_policy:
        infos.setdefault(info.name, info)
    return self._values(list(args)), infos


def _vjp_probes(gradient, rngs, zeros, args):
  """Mean of `(J^T u)^2` over Rademacher vectors u (one per key in `rngs`): Hutchinson's estimate
  of each residual element's weight. The gradient is linearised once; each probe is one pass
  through its transpose."""
  grads, pullback = jax.vjp(lambda d: gradient(d, *args)[0], zeros)
  leaves, tree = jax.tree.flatten(grads)

  def probe(weights, rng):
    signs = [jax.random.rademacher(k, g.shape, g.dtype) for k, g in zip(jax.random.split(rng, len(leaves)), leaves)]
    (v,) = pullback(jax.tree.unflatten(tree, signs))
    return jax.tree.map(lambda w, x: w + x.astype(jnp.float32) ** 2 / len(rngs), weights, v), None

  return jax.lax.scan(probe, {k: jnp.zeros(z.shape, jnp.float32) for k, z in zeros.items()}, rngs)[0]


def _jvp_probes(gradient, selections, rngs, sigma, zeros, args):
  """||J t||^2 for each tangent t: Rademacher signs (from `rngs[i]`) times `sigma` on the
  residuals that row `selections[i]` marks with 1.0, zero elsewhere. The gradient is linearised
  once; each tangent is one forward-mode pass through the linearisation."""
  _, linear = jax.linearize(lambda d: gradient(d, *args)[0], zeros)

  def probe(_, inputs):
    selected, rng = inputs
    keys = jax.random.split(rng, len(sigma))
    tangent = {k: (selected[i] * jax.random.rademacher(r, sigma[k].shape, jnp.float32) * sigma[k]).astype(zeros[k].dtype)
               for i, (r, k) in enumerate(zip(keys, sorted(sigma)))}
    return None, _squared_norm(linear(tangent))

  return jax.lax.scan(probe, None, (selections, rngs))[1]


def _gact_probe(gradient, one_bit_a, one_bit_b, eight_bit, args):
  """GACT's C: the mean squared distance of the two 1-bit gradients from the 8-bit gradient."""
  grads = [gradient(deltas, *args)[0] for deltas in (one_bit_a, one_bit_b, eight_bit)]
  distance = lambda a, b: _squared_norm(jax.tree.map(jnp.subtract, a, b))
  return (distance(grads[0], grads[2]) + distance(grads[1], grads[2])) / 2


def _squared_norm(tree) -> jax.Array:
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


@functools.partial(jax.jit, static_argnames="group_size")
def _noise_total(weight: jax.Array, value: jax.Array, group_size: int) -> jax.Array:
  """`sum(weight * rounding variance of value)` at each width of `codec.SUPPORTED_BITS`.

  Compiled per residual shape (few in a network), not once for all residuals: XLA:CPU compiles
  one program with every residual's codec arithmetic slowly.
  """
  return jnp.stack([jnp.sum(weight * codec.rounding_variance(value, b, group_size)) for b in codec.SUPPORTED_BITS])


def _noise_totals(weights: dict, values: dict, groups: Groups) -> dict[Key, np.ndarray]:
  return jax.device_get({k: _noise_total(weights[k], values[k], g) for k, g in groups})


@functools.partial(jax.jit, static_argnames="group_size")
def _rounding_std(value: jax.Array, group_size: int) -> jax.Array:
  """Per-element standard deviation of the 2-bit rounding error: the noise "jvp" probes with."""
  return jnp.sqrt(codec.rounding_variance(value, 2, group_size))


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def _rounding_error(value: jax.Array, seed: jax.Array, bits: int, group_size: int) -> jax.Array:
  return codec.dequantize(codec.quantize(value, bits, group_size, seed=seed)) - value


def _variance_vjp(probed: _Probed, args, values: dict, groups: Groups, options: Settings) -> dict[Key, np.ndarray]:
  zeros = {k: jnp.zeros_like(v) for k, v in values.items()}
  weights = probed.vjp_probes(jax.random.split(jax.random.key(options.seed), options.num_probes), zeros, list(args))
  return _noise_totals(weights, values, groups)


def _variance_jvp(probed: _Probed, args, values: dict, groups: Groups, options: Settings) -> dict[Key, np.ndarray]:
  reference = codec.SUPPORTED_BITS.index(2)  # `_rounding_std`'s width; others scale by the codec's noise ratio
  zeros = {k: jnp.zeros_like(v) for k, v in values.items()}
  sigma = {k: _rounding_std(values[k], g) for k, g in groups}
  noise = _noise_totals({k: 1.0 for k in values}, values, groups)
  selections = np.repeat(np.eye(len(values), dtype=np.float32), options.num_probes, axis=0)  # residual by residual
  rngs = jax.random.split(jax.random.key(options.seed), len(selections))
  squared = np.asarray(probed.jvp_probes(selections, rngs, sigma, zeros, list(args))).reshape(len(values), -1)
  return {k: total * noise[k] / noise[k][reference] if noise[k][reference] > 0 else np.zeros(len(noise[k]))
          for k, total in zip(sorted(values), squared.mean(axis=1))}


def _variance_gact(probed: _Probed, args, values: dict, groups: Groups, options: Settings) -> dict[Key, np.ndarray]:
  zeros = {k: jnp.zeros_like(v) for k, v in values.items()}
  seeds = np.random.default_rng(options.seed).integers(0, 2**31, size=(len(values), 3), dtype=np.uint32)
  constants = {}
  for (key, group_size), key_seeds in zip(tqdm(groups, desc="calibrate (gact, 3 passes per residual)",
                                               disable=not options.progress or None, leave=False), seeds):
    errors = [_rounding_error(values[key], s, bits, group_size) for bits, s in zip((1, 1, 8), key_seeds)]
    constants[key] = float(probed.gact_probe(*({**zeros, key: e} for e in errors), list(args)))
  return {k: np.array([c / (2**b - 1) ** 2 if b <= 8 else 0.0 for b in codec.SUPPORTED_BITS]) for k, c in constants.items()}


_ESTIMATORS = {"vjp": _variance_vjp, "jvp": _variance_jvp, "gact": _variance_gact}
METHODS = tuple(_ESTIMATORS)


# --- calibrate -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
  """How `calibrate` measures and allocates; checked when made (see `calibrate` for each field)."""
  avg_bits: float | None = None
  budget_bytes: int | None = None
  candidates: Sequence[int] = DEFAULT_CANDIDATES
  method: str = "vjp"
  num_probes: int = 4
  seed: int = 0
  progress: bool = True

  def __post_init__(self):
    if (self.avg_bits is None) == (self.budget_bytes is None):
      raise ValueError("give exactly one of avg_bits= (an average width, e.g. 2.0) or budget_bytes=.")
    candidates = tuple(sorted({codec.check_bits(b, what="candidates entry") for b in self.candidates}))
    object.__setattr__(self, "candidates", candidates)
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r} is not supported; use one of {METHODS}.")
    if isinstance(self.num_probes, bool) or not isinstance(self.num_probes, int) or self.num_probes < 1:
      raise ValueError(f"num_probes={self.num_probes!r} must be a positive int.")
    if self.avg_bits is not None and not 0 < self.avg_bits <= 32:
      raise ValueError(f"avg_bits={self.avg_bits!r} must be in (0, 32].")


def calibrate(loss_fn: Callable, *args: Any, avg_bits: float | None = None, budget_bytes: int | None = None,
              candidates: Sequence[int] = DEFAULT_CANDIDATES, method: str = "vjp", num_probes: int = 4,
              argnums: int = 0, has_aux: bool = False, seed: int = 0, progress: bool = True,
              **kwargs: Any) -> Calibrated:
  """Chooses each residual's bit width from its measured effect on the gradient, under a budget.

  Runs on a probe batch (a slice of a training batch is enough): the compressed calls inside
  `loss_fn` keep their residuals exact while the sensitivity of the gradient of `loss_fn` (with
  respect to `args[argnums]`) to each residual's rounding noise is measured; then the widths that
  minimise the predicted gradient variance within the budget are chosen (see `allocate`).

  Residuals that jact rebuilds from another one (`ResidualInfo.rebuilt_from`: a normalisation's
  `2 * x` from its `x - mean`) get that one's width and cost no bytes. Which ones are rebuilt
  depends on the compressed calls being compressed: calibrate a model wrapped at a width below 32
  (any width; residuals are kept exact here). With calls at 32 bits every residual is priced at
  its own width, and the calibrated policy then stores less than its budget.

  A `lax.scan` inside a compressed call (an RNN, layers under `nn.scan`) is probed with its body's
  residuals stacked over the steps and named as the body names them (`Model/loop0/tanh0`): each
  gets one width, which the loop's body then uses at every step.

  Nothing global changes: no RNG state, no model state (a `loss_fn` that returns updated
  BatchNorm statistics as aux has them discarded), and the compressed calls keep their own
  policies outside this function. Apply the result with `bits=policy` or `jact.use_policy(policy)`.

  Args:
    loss_fn: returns a scalar loss (or `(loss, aux)` with `has_aux=True`).
    *args, **kwargs: its arguments, with the probe batch. Positional arguments are inputs of
      the compiled probes (pytrees of arrays); keyword arguments are passed as they are (flags).
    avg_bits: budget as an average width: the bytes of every residual at `avg_bits` per value
      plus the codec's per-group metadata. Give this or `budget_bytes`.
    budget_bytes: budget in stored bytes, metadata included.
    candidates: the widths to choose from, a subset of (1, 2, 4, 8, 16, 32).
    method: "vjp" (default: a few reverse passes for all residuals), "jvp" (one forward-mode
      pass per residual and probe) or "gact" (GACT's estimator: three gradients per residual).
    num_probes: random probes for "vjp" and "jvp". Each adds one pass (about two gradients'
      cost); 4 predicted the measured variance as well as 8 (README, "Adaptive bits").
    argnums: which argument the gradient is taken with respect to (the parameters).
    has_aux: `loss_fn` returns `(loss, aux)`.
    seed: seeds the probes.
    progress: show a progress bar over the residuals of "gact" ("vjp" and "jvp" are one call).

  Returns:
    A `jact.policies.Calibrated` policy.
  """
  options = Settings(avg_bits, budget_bytes, candidates, method, num_probes, seed, progress)
  return calibrate_with(_Probed(loss_fn, kwargs, argnums, has_aux), args, options)


def calibrate_with(probed: _Probed, args: Sequence[Any], options: Settings) -> Calibrated:
  """`calibrate` on `args` with a prepared `_Probed` (whose compilations it reuses)."""
  values, infos = probed.residuals(args)
  groups = tuple((k, infos[k[0]].group_size) for k in values)
  per_key = _ESTIMATORS[options.method](probed, args, values, groups, options)

  names = list(dict.fromkeys(name for name, _ in per_key))
  variance = {n: sum(v for (name, _), v in per_key.items() if name == n) for n in names}
  shapes = {n: tuple(tuple(values[k].shape) for k in per_key if k[0] == n) for n in names}
  rows = []
  for n in names:
    info = infos[n]
    rows.append(CalibratedResidual(n, 32, len(shapes[n]), sum(math.prod(s) for s in shapes[n]) * info.dtype.itemsize,
                                   info.group_size, tuple(float(v) for v in variance[n]), shapes[n], info.dtype.name,
                                   info.rebuilt_from))
  # A residual rebuilt from another is not stored, and its noise is that residual's: the width of
  # the stored one is chosen for both, with their variances summed, at the stored one's bytes.
  stored = [r for r in rows if not r.rebuilt_from]
  budget_bytes = options.budget_bytes
  if budget_bytes is None:
    budget_bytes = int(sum(math.prod(s) * options.avg_bits / 8 + 4 * codec.Layout.of(s, r.group_size).num_groups
                           for r in stored for s in r.shapes))
  var_matrix = np.array([[r.variance_at(b) + sum(m.variance_at(b) for m in rows if m.rebuilt_from == r.name)
                          for b in options.candidates] for r in stored])
  byte_matrix = np.array([[r.stored_nbytes_at(b) for b in options.candidates] for r in stored])
  choice = allocate(var_matrix, byte_matrix, budget_bytes)
  bits = {r.name: options.candidates[c] for r, c in zip(stored, choice)}
  narrowest = min(options.candidates)  # for residuals rebuilt exactly from small values
  rows = tuple(dataclasses.replace(r, bits=bits.get(r.rebuilt_from or r.name, narrowest)) for r in rows)
  return Calibrated(rows, options.candidates, int(budget_bytes), options.method)
