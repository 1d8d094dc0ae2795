"""The real-data helpers behind the accuracy benchmark, the demo and the notebooks (no training)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jact.models import datasets, graphs, training


def test_digits_split_is_a_partition_standardised_on_the_training_set():
  split = datasets.digits(test_fraction=0.25, seed=0)
  train, test = split.train["images"], split.test["images"]
  assert train.shape[1:] == test.shape[1:] == (8, 8, 1)
  assert len(train) + len(test) == 1797 and len(test) == round(0.25 * 1797)
  # Standardised with the training set's statistics only: its per-pixel mean and overall std.
  from sklearn.datasets import load_digits
  raw = load_digits().images.astype(np.float64)
  train_index, test_index = datasets._shuffled_split(1797, 0.25, seed=0)
  mean, std = raw[train_index].mean(axis=0), raw[train_index].std()
  np.testing.assert_allclose(np.asarray(test)[..., 0], (raw[test_index] - mean) / std, atol=1e-5)
  np.testing.assert_allclose(np.asarray(train).mean(axis=0), 0.0, atol=1e-5)
  assert set(np.unique(split.test["labels"])) == set(range(10))


def test_encode_text_maps_printable_ascii_and_the_rest_to_unknown():
  ids = datasets.encode_text("ab\né")
  assert ids.tolist()[:3] == [10, 11, datasets._ALPHABET.index("\n")]
  assert ids[3] == datasets.TEXT_VOCAB_SIZE - 1 and ids.max() < datasets.TEXT_VOCAB_SIZE


def test_python_docs_holds_out_the_end_of_the_text():
  split = datasets.python_docs(seq_len=64, test_fraction=0.1)
  train, test = split.train["input_ids"], split.test["input_ids"]
  assert train.shape[0] == 1 and test.shape[1] == 64
  # Whole windows of the held-out tenth (the last window may be cut).
  total = train.shape[1] / 0.9
  assert 0.1 * total - 64 <= test.size <= 0.1 * total + 1
  windows = datasets.text_windows(train, jnp.array([0, 5]), 64)["input_ids"]
  np.testing.assert_array_equal(windows[1], train[0, 5:69])


def test_planted_graph_scores_disjoint_nodes():
  split = datasets.planted_graph(graphs.GraphSize(200, 800, 8, 4), train_fraction=0.5)
  train, test = np.asarray(split.train["labels"]), np.asarray(split.test["labels"])
  scored_train, scored_test = train != datasets.UNSCORED, test != datasets.UNSCORED
  assert not np.any(scored_train & scored_test) and np.all(scored_train | scored_test)
  assert scored_train.sum() == 100


def test_masked_cross_entropy_ignores_unscored_labels():
  logits = jax.random.normal(jax.random.key(0), (6, 5))
  labels = jnp.array([1, datasets.UNSCORED, 3, 0, datasets.UNSCORED, 4])
  scored = labels != datasets.UNSCORED
  expected = optax.softmax_cross_entropy_with_integer_labels(logits[scored], labels[scored]).mean()
  assert float(datasets.masked_cross_entropy(logits, labels)) == pytest.approx(float(expected), rel=1e-6)
  correct, count = datasets.correct_and_scored(logits, labels)
  assert int(count) == 4
  assert int(correct) == int(jnp.sum(jnp.argmax(logits[scored], -1) == labels[scored]))


@pytest.mark.parametrize("budget", [0, 7, 100, 1000, 12_345])
@pytest.mark.parametrize("start", [1, 64])
@pytest.mark.parametrize("growth", [2.0, 1.2])
def test_max_batch_finds_the_largest_fitting_batch_within_its_resolution(budget, start, growth):
  peak_at = lambda batch: 10 * batch + 5  # grows with the batch, like compiled memory
  exact = max(0, (budget - 5) // 10)
  found = training.max_batch(peak_at, budget, start=start, resolution=0.05, growth=growth)
  assert peak_at(found) <= budget or found == 0
  assert exact - max(1, int(0.05 * exact)) <= found <= exact


def test_smooth_is_the_trailing_moving_average():
  values = np.arange(10, dtype=np.float64) ** 2
  smoothed = training.smooth(values, 3)
  expected = [values[max(0, i - 2):i + 1].mean() for i in range(10)]
  np.testing.assert_allclose(smoothed, expected, rtol=1e-12)


def test_step_keys_depend_on_seed_and_step_only():
  same = [jax.random.key_data(k) for k in training.step_keys(0, 3)]
  again = [jax.random.key_data(k) for k in training.step_keys(0, 3)]
  other = [jax.random.key_data(k) for k in training.step_keys(1, 3)]
  assert all(np.array_equal(a, b) for a, b in zip(same, again))
  assert not any(np.array_equal(a, b) for a, b in zip(same, other))
