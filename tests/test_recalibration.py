"""Recalibration: calibrates exactly at the interval, retraces only when the bits change, and has
no side effects on model state or global RNGs."""

import functools
import random

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jact
from jact.models import small


def test_calibrates_exactly_at_the_interval():
  """Steps 0, 3, 6, 9 for `every=3` (see also the next test); a loop resumed mid-interval
  calibrates at once, then on the interval."""
  loss, params, x = small.mlp()
  recalibration = jact.Recalibration(loss(2), every=3, avg_bits=2, progress=False)
  assert all(recalibration.due(step) for step in range(3))  # nothing calibrated yet
  for step in range(4, 10):
    assert recalibration.due(step) == (step == 4 or step % 3 == 0)
    recalibration(step, params, x)
  assert [step for step, _ in recalibration.history] == [4, 6, 9]


def test_jit_cache_is_hit_between_recalibrations():
  """The step is traced once per distinct bit table: never between calibrations, never for a
  table returned before."""
  loss, params, x = small.mlp(scales=(4.0, 1.0, 0.25))
  reversed_params = params[::-1]  # the sensitive layer moves from first to last: other bits

  def train(probes):
    """12 steps, calibrating every 3 on `probes` in turn; a fresh jitted step counts its traces."""
    traces = []

    @functools.partial(jax.jit, static_argnames="policy")
    def train_step(params, x, policy):
      traces.append(policy)
      with jact.use_policy(policy):
        grads = jax.grad(loss(2))(params, x)
      return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)

    recalibration = jact.Recalibration(loss(2), every=3, avg_bits=2, candidates=(1, 2, 4, 8), progress=False)
    trained, returned = params, []
    for step in range(12):
      returned.append(recalibration(step, probes[step // 3 % len(probes)], x))
      trained = train_step(trained, x, policy=returned[-1])
    assert [step for step, _ in recalibration.history] == [0, 3, 6, 9]
    tables = {tuple(sorted(p.bits.items())) for _, p in recalibration.history}
    return len(recalibration.history), len(tables), len(traces), returned

  calibrations, tables, traces, returned = train([params])
  assert (calibrations, tables, traces) == (4, 1, 1)
  assert all(p is returned[0] for p in returned)
  calibrations, tables, traces, returned = train([params, reversed_params])
  assert (calibrations, tables, traces) == (4, 2, 2)
  assert returned[0] is returned[6] and returned[3] is returned[9] and returned[0] != returned[3]


class ConvBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), use_bias=False)(x)
    return nn.relu(nn.BatchNorm(use_running_average=False, momentum=0.9)(x))


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = jact.compressed(ConvBlock, bits=2)(name=f"block{i}")(x)
    return nn.Dense(4)(x.mean((1, 2)))


def test_probes_change_no_state_and_no_global_rng():
  """Training with recalibration on a probe batch of very different statistics gives bitwise the
  training of the same policies without any probe; Python's and NumPy's global RNGs are untouched."""
  model = Net()
  images = jax.random.normal(jax.random.key(0), (8, 8, 8, 8))
  labels = jnp.arange(8) % 4
  probe = 10 * jax.random.normal(jax.random.key(1), images.shape) + 5  # its BatchNorm statistics would show
  variables = jax.jit(model.init)(jax.random.key(2), images)

  def loss_fn(params, batch_stats, images, labels):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, mutable=["batch_stats"])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels]), updates["batch_stats"]

  @functools.partial(jax.jit, static_argnames="policy")
  def train_step(params, batch_stats, policy):
    with jact.use_policy(policy):
      (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, images, labels)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), batch_stats

  numpy_state, python_state = np.random.get_state(), random.getstate()
  recalibration = jact.Recalibration(loss_fn, every=2, has_aux=True, avg_bits=2, progress=False)
  params, batch_stats, used = variables["params"], variables["batch_stats"], []
  for step in range(3):
    used.append(recalibration(step, params, batch_stats, probe, labels))
    params, batch_stats = train_step(params, batch_stats, policy=used[-1])
  assert len(recalibration.history) == 2
  np.testing.assert_array_equal(np.random.get_state()[1], numpy_state[1])
  assert random.getstate() == python_state

  replay_params, replay_stats = variables["params"], variables["batch_stats"]
  for policy in used:
    replay_params, replay_stats = train_step(replay_params, replay_stats, policy=policy)
  for a, b in zip(jax.tree.leaves((params, batch_stats)), jax.tree.leaves((replay_params, replay_stats)), strict=True):
    np.testing.assert_array_equal(a, b)


def test_clear_errors():
  loss, _, _ = small.mlp()
  with pytest.raises(ValueError, match="every=0 must be a positive int"):
    jact.Recalibration(loss(2), every=0, avg_bits=2)
  with pytest.raises(TypeError, match="unknown option.*avg_bits"):
    jact.Recalibration(loss(2), average_bits=2)
  with pytest.raises(ValueError, match="exactly one of avg_bits"):
    jact.Recalibration(loss(2))
