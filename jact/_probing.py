"""The rules a compressed call follows while `jact.calibrate` probes it.

Calibration measures how the gradient responds to noise in each residual. While it probes
(`jact._context.probing`), a compressed call keeps every residual at full precision, reports
their values (`Probe.captured`) and adds the probe's perturbation (`Probe.deltas`) to each in the
backward pass (`probed`). A loop's body compressed step by step stores its residuals as they are,
marked with their names (`exposed`), so that the enclosing call probes them stacked over the
steps under the body's names.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jact import _context, _schedule
from jact.info import ResidualTable


class ProbingRules:
  """The probing custom_vjps of one `jact._vjp.Traced` call (which builds them with itself)."""

  def __init__(self, traced: Any):
    self.traced = traced
    self.probed = jax.custom_vjp(self._probed_primal)
    self.probed.defvjp(self._probed_forward, self._probed_backward)
    self.exposed = jax.custom_vjp(traced.primal)
    self.exposed.defvjp(self._exposed_forward, self._exposed_backward)

  def call(self, seed, inputs) -> list[Any]:
    """The call with each residual the policy would size perturbed by the probe's delta for it."""
    probe = _context.current().probe
    plan = self.traced.plan_for(self.traced.with_seed(seed, inputs))
    counts = dict(probe.counts)
    deltas = []
    for r in plan.residuals:
      eligible = r.info.sized_by_policy
      deltas.append(probe.deltas.get((r.info.name, counts.get(r.info.name, 0))) if eligible else None)
      if eligible:
        counts[r.info.name] = counts.get(r.info.name, 0) + 1
    return self.probed(seed, deltas, *inputs)

  def _probed_primal(self, seed, deltas, *inputs):
    return self.traced.pure(*self.traced.with_seed(seed, inputs))

  def _probed_forward(self, seed, deltas, *inputs):
    traced = self.traced
    inputs = traced.with_seed(seed, inputs)
    plan = traced.plan_for(inputs)
    state = _context.current()
    if state.regions is not None:
      state.regions.append(ResidualTable(plan.infos))
    outs, stored = _schedule.run_forward_uncompressed(plan, traced.options, seed, inputs)
    for r, value in zip(plan.residuals, stored):
      if r.info.sized_by_policy:
        state.probe.captured[state.probe.key(r.info.name)] = value
    return outs, (_schedule.Stored(stored, plan), deltas)

  def _probed_backward(self, res, cts):
    stored, deltas = res
    perturbed = [a if d is None else a + d.astype(a.dtype) for a, d in zip(stored.arrays, deltas)]
    perturbed += stored.arrays[len(deltas):]  # the parameters kept for recomputation
    grads = _schedule.run_backward(stored.plan, self.traced.options, perturbed, list(cts))
    return (np.zeros((), jax.dtypes.float0), jax.tree.map(jnp.zeros_like, deltas), *self.traced.own_gradients(grads))

  def _exposed_forward(self, seed, *inputs):
    # A loop's body while calibrate probes: every residual stored as it is; those calibrate
    # could compress marked with their names, so that the enclosing call probes them stacked.
    traced = self.traced
    inputs = traced.with_seed(seed, inputs)
    plan = traced.plan_for(inputs)
    outs, stored = _schedule.run_forward_uncompressed(plan, traced.options, seed, inputs)
    return outs, _schedule.Stored(_schedule.marked(plan, stored, exposing=True), plan)

  def _exposed_backward(self, res, cts):
    grads = _schedule.rule(res.plan, "backward", self.traced.options)(res.arrays, list(cts))
    return (np.zeros((), jax.dtypes.float0), *self.traced.own_gradients(grads))
