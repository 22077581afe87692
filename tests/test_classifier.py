"""Tests for gdistill.eval.classifier on a tiny synthetic dataset (a few seconds)."""

import jax
import numpy as np
import pytest

from gdistill.eval import classifier

NUM_CLASSES = 4


def _squares_dataset(n, seed):
  """28x28x1 uint8 noise with a bright 8x8 square in a class-dependent quadrant."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, size=n)
  images = rng.integers(0, 60, size=(n, 28, 28, 1)).astype(np.uint8)
  for i, y in enumerate(labels):
    r0 = 3 + 14 * (y // 2) + rng.integers(0, 3)
    c0 = 3 + 14 * (y % 2) + rng.integers(0, 3)
    images[i, r0:r0 + 8, c0:c0 + 8, 0] = 230
  return images, labels


@pytest.fixture(scope="module")
def trained():
  train_x, train_y = _squares_dataset(512, seed=0)
  test_x, test_y = _squares_dataset(200, seed=1)
  params, acc = classifier.train_classifier(
      train_x, train_y, test_x, test_y, steps=40, batch_size=32, seed=0,
      learning_rate=2e-3, eval_batch_size=64)
  return params, acc, test_x, test_y


def test_reaches_high_accuracy_on_separable_data(trained):
  _, acc, _, _ = trained
  assert acc >= 0.95


def test_features_and_logits_shapes_and_consistency(trained):
  params, acc, test_x, test_y = trained
  net = classifier.ClassifierFeatures(params, num_classes=NUM_CLASSES, batch_size=64)
  feats, logits = net.features_and_logits(test_x[:150])  # 150 = 2 full + 1 padded
  assert feats.shape == (150, 128) and logits.shape == (150, NUM_CLASSES)
  assert (feats >= 0).all()  # post-ReLU
  # Batch composition must not change results.
  feats_small, logits_small = net(test_x[:5, :, :, 0])  # [n, H, W] accepted
  np.testing.assert_allclose(feats_small, feats[:5], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits_small, logits[:5], rtol=1e-5, atol=1e-5)
  full_acc = np.mean(np.argmax(net(test_x)[1], -1) == test_y)
  assert full_acc == pytest.approx(acc)


def test_training_is_deterministic_given_seed():
  x, y = _squares_dataset(64, seed=2)
  kwargs = dict(steps=3, batch_size=16, seed=7, augment=True, eval_batch_size=64)
  p1, a1 = classifier.train_classifier(x, y, x, y, **kwargs)
  p2, a2 = classifier.train_classifier(x, y, x, y, **kwargs)
  assert a1 == a2
  jax.tree_util.tree_map(np.testing.assert_array_equal, p1, p2)


def test_batch_indices_cover_each_epoch_once():
  n, bs = 10, 4
  idx = np.concatenate([classifier._batch_indices(n, bs, s, seed=3) for s in range(5)])
  np.testing.assert_array_equal(np.sort(idx[:n]), np.arange(n))  # epoch 0
  np.testing.assert_array_equal(np.sort(idx[n:2 * n]), np.arange(n))  # epoch 1


def test_save_load_round_trip(trained, tmp_path):
  params, acc, test_x, _ = trained
  path = tmp_path / "sub" / "classifier.npz"
  meta = {"dataset": "synthetic_squares", "image_shape": (28, 28, 1),
          "num_classes": NUM_CLASSES, "test_accuracy": acc, "steps": 40}
  classifier.save_classifier(path, params, meta)
  loaded, loaded_meta = classifier.load_classifier(path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded)
  assert loaded_meta["version"] == classifier.CLASSIFIER_VERSION
  assert loaded_meta["image_shape"] == [28, 28, 1]
  assert loaded_meta["test_accuracy"] == pytest.approx(acc)
  assert loaded_meta["dataset"] == "synthetic_squares" and loaded_meta["steps"] == 40
  a = classifier.ClassifierFeatures(params, num_classes=NUM_CLASSES, batch_size=64)
  b = classifier.ClassifierFeatures.from_file(path, batch_size=64)
  np.testing.assert_array_equal(a(test_x[:10])[0], b(test_x[:10])[0])
  with pytest.raises(ValueError, match="shape"):
    b(np.zeros((2, 32, 32, 3), np.uint8))


def test_save_requires_meta_and_load_checks_file(tmp_path, trained):
  params = trained[0]
  with pytest.raises(KeyError, match="test_accuracy"):
    classifier.save_classifier(tmp_path / "c.npz", params,
                               {"dataset": "x", "image_shape": (28, 28, 1),
                                "num_classes": NUM_CLASSES})
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    classifier.load_classifier(tmp_path / "missing.npz")
