"""Norms of whole pytrees in float64, shared by the tests (and tests/sharding_checks.py)."""

import jax
import numpy as np


def tree_norm(tree) -> float:
  """The Euclidean norm of all of a tree's leaves together, in float64."""
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))


def relative_error(actual, expected) -> float:
  """||actual - expected|| / ||expected|| over whole trees, differences taken in float64."""
  diff = jax.tree.map(lambda a, e: np.asarray(a, np.float64) - np.asarray(e, np.float64), actual, expected)
  return tree_norm(diff) / tree_norm(expected)
