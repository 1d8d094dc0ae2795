"""Re-calibration during training: a fresh bit table every `every` steps (GACT's adapt interval).

Which residuals matter changes as a model trains, so GACT re-measures its sensitivities every
`adapt_interval` steps (1000 by default). `Recalibration` does the same for a JAX training loop:
called at every step, it returns the policy to train with, re-running `jact.calibrate` on the
probe batch it is given when a new interval begins.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable

from jact import sensitivity
from jact.policies import Calibrated


class Recalibration:
  """Keeps a calibrated bit policy current during training: `jact.calibrate` every `every` steps.

  Example, with an optax optimizer and a Flax model with BatchNorm::

    def loss_fn(params, batch_stats, batch):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, batch["x"],
                                    mutable=["batch_stats"])
      return cross_entropy(logits, batch["y"]), updates["batch_stats"]

    @functools.partial(jax.jit, static_argnames="policy")
    def train_step(params, batch_stats, opt_state, batch, policy):
      with jact.use_policy(policy):    # every compressed module traced here uses `policy`
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, batch)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    recalibration = jact.Recalibration(loss_fn, every=1000, avg_bits=2, has_aux=True)
    for step, batch in enumerate(batches):
      policy = recalibration(step, params, batch_stats, probe_batch)
      params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state, batch, policy=policy)

  When it calibrates: at the first call, and at the first call of each later interval of `every`
  steps (steps 0, 1000, 2000, ...; a loop resumed at step 1500 calibrates at 1500, then 2000).
  The calibration at step `s` uses the seed `seed + s`.

  Retracing. Policies are hashable data, so passing the policy to a jitted step as a static
  argument retraces and recompiles the step when the policy changes and hits jit's cache when it
  does not. A calibration whose bit table equals one returned before returns that same policy
  object (the table from the new measurement is in `history`), so the step is recompiled only
  when the bits really change: at most once per calibration, and never for a table seen before.

  Cost. Each calibration costs what `jact.calibrate` does on the probe batch (for the default
  method "vjp", `num_probes` reverse passes through the backward pass); its compilations are made
  at the first calibration and reused by later ones while the arguments keep their shapes.

  Side effects: none. No global RNG is drawn from or reseeded, and the probe passes change no
  model state (an aux output of `loss_fn`, such as updated BatchNorm statistics, is discarded).

  Attributes:
    every: the interval, in steps.
    history: `(step, policy)` for every calibration so far, as measured.
  """

  def __init__(self, loss_fn: Callable, every: int = 1000, *, argnums: int = 0, has_aux: bool = False,
               **options: Any):
    """Prepares the calibration; nothing is measured until the first call.

    Args:
      loss_fn: returns a scalar loss (or `(loss, aux)` with `has_aux=True`); its positional
        arguments are arrays (pytrees of arrays): bind flags with `functools.partial`.
      every: calibrate at the first call of every interval of this many steps.
      argnums: which argument of `loss_fn` the gradient is taken with respect to (the parameters).
      has_aux: `loss_fn` returns `(loss, aux)`; the aux is discarded.
      **options: `jact.calibrate`'s options: `avg_bits` or `budget_bytes` (one of them), and
        optionally `candidates`, `method`, `num_probes`, `seed`, `progress`.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
      raise ValueError(f"every={every!r} must be a positive int (a number of steps).")
    try:
      self._options = sensitivity.Settings(**options)
    except TypeError as error:
      fields = [f.name for f in dataclasses.fields(sensitivity.Settings)]
      raise TypeError(f"Recalibration got an unknown option ({error}); calibrate's options are {fields}.") from None
    self.every = every
    self.history: list[tuple[int, Calibrated]] = []
    self._probed = sensitivity._Probed(loss_fn, {}, argnums, has_aux)
    self._seen: dict[tuple, Calibrated] = {}
    self._policy: Calibrated | None = None

  @property
  def policy(self) -> Calibrated | None:
    """The policy in use: the one the last call returned (None before the first call)."""
    return self._policy

  def due(self, step: int) -> bool:
    """Whether a call at `step` calibrates: no calibration yet, or a new interval began."""
    step = operator.index(step)
    return not self.history or step // self.every != self.history[-1][0] // self.every

  def __call__(self, step: int, *args: Any) -> Calibrated:
    """The policy to train step `step` with, calibrated on `args` first when due.

    Args:
      step: the training step (a Python or NumPy int, or a concrete integer JAX scalar).
      *args: the arguments of `loss_fn`: current parameters, model state, probe batch.

    Returns:
      A `jact.policies.Calibrated` policy: the same object as before unless the bits changed.
    """
    step = operator.index(step)
    if self.due(step):
      options = dataclasses.replace(self._options, seed=self._options.seed + step)
      measured = sensitivity.calibrate_with(self._probed, args, options)
      self.history.append((step, measured))
      table = (measured.default, tuple(sorted(measured.bits.items())))
      self._policy = self._seen.setdefault(table, measured)
    return self._policy
