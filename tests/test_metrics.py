"""Tests for gdistill.eval.metrics (pure numpy; runs in about a second)."""

import numpy as np
import pytest
import scipy.linalg

from gdistill.eval import metrics


def _gaussian_features(rng, n, d, *, shift=0.0):
  return rng.normal(size=(n, d)) + shift


def test_quantize_uint8_endpoints_and_rounding():
  x = np.array([-5.0, -1.0, -0.999, 0.0, 0.5, 1.0, 7.0], np.float32)
  u = metrics.quantize_uint8(x)
  assert u.dtype == np.uint8
  # (x + 1) * 127.5 = 0, 0, 0.1275, 127.5, 191.25, 255, 255 -> round half to even.
  np.testing.assert_array_equal(u, [0, 0, 0, 128, 191, 255, 255])


def test_quantize_uint8_matches_formula_on_random_images():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1.2, 1.2, size=(4, 8, 8, 3))
  expected = np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)
  np.testing.assert_array_equal(metrics.quantize_uint8(x), expected)


def test_quantize_uint8_rejects_integer_input():
  with pytest.raises(TypeError, match="float images"):
    metrics.quantize_uint8(np.zeros((2, 2), np.uint8))


def test_feature_statistics_matches_numpy():
  rng = np.random.default_rng(1)
  f = rng.normal(size=(50, 4)).astype(np.float32)
  mu, sigma = metrics.feature_statistics(f)
  assert mu.dtype == np.float64 and sigma.shape == (4, 4)
  np.testing.assert_allclose(mu, f.astype(np.float64).mean(0))
  np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False))


def test_fid_identical_sets_is_zero():
  rng = np.random.default_rng(2)
  mu, sigma = metrics.feature_statistics(_gaussian_features(rng, 500, 16))
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_grows_monotonically_with_mean_shift():
  rng = np.random.default_rng(3)
  ref = metrics.feature_statistics(_gaussian_features(rng, 2000, 8))
  fids = []
  for shift in [0.0, 0.25, 0.5, 1.0, 2.0]:
    mu, sigma = metrics.feature_statistics(
        _gaussian_features(rng, 2000, 8, shift=shift))
    fids.append(metrics.frechet_distance(mu, sigma, *ref))
  assert all(a < b for a, b in zip(fids, fids[1:])), fids
  # A pure shift s in all d=8 dimensions contributes ~d s^2.
  assert fids[-1] == pytest.approx(8 * 2.0 ** 2, rel=0.1)


def test_fid_closed_form_diagonal_gaussians():
  rng = np.random.default_rng(4)
  d = 6
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  got = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_fid_matches_direct_scipy_computation():
  rng = np.random.default_rng(5)
  mu1, sigma1 = metrics.feature_statistics(rng.normal(size=(200, 10)))
  a = rng.normal(size=(10, 10))
  mu2, sigma2 = metrics.feature_statistics(rng.normal(size=(200, 10)) @ a + 0.3)
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
  expected = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
              - 2 * np.trace(covmean))
  got = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
  assert got == pytest.approx(expected, rel=1e-9)
  # Symmetric in its two arguments.
  assert metrics.frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(
      got, rel=1e-8)


def test_fid_singular_covariances_use_eps_fallback():
  rng = np.random.default_rng(6)
  # Fewer samples than dimensions: rank-deficient covariances.
  mu1, sigma1 = metrics.feature_statistics(rng.normal(size=(5, 20)))
  mu2, sigma2 = metrics.feature_statistics(rng.normal(size=(5, 20)) + 1.0)
  fid = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
  assert np.isfinite(fid) and fid > 0


def test_fid_rejects_shape_mismatch():
  with pytest.raises(ValueError, match="mean shapes"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_uniform_logits_is_one():
  mean, std = metrics.inception_score(np.zeros((100, 7)), num_splits=10)
  assert mean == pytest.approx(1.0, abs=1e-12)
  assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_distinct_predictions_is_num_classes():
  k = 10
  labels = np.tile(np.arange(k), 20)  # every split of 20 holds each class twice
  logits = 100.0 * np.eye(k)[labels]
  mean, std = metrics.inception_score(logits, num_splits=10)
  assert mean == pytest.approx(k, rel=1e-9)
  assert std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_is_shift_invariant_and_bounded():
  rng = np.random.default_rng(7)
  z = rng.normal(size=(300, 5)) * 3
  mean, _ = metrics.inception_score(z, num_splits=3)
  mean_shifted, _ = metrics.inception_score(z + 1000.0, num_splits=3)
  assert 1.0 < mean < 5.0
  assert mean_shifted == pytest.approx(mean, rel=1e-9)


def test_precision_recall_identical_sets():
  rng = np.random.default_rng(8)
  x = rng.normal(size=(300, 16))
  assert metrics.precision_recall(x, x, k=3) == (1.0, 1.0)


def test_precision_recall_far_apart_sets():
  rng = np.random.default_rng(9)
  real = rng.normal(size=(200, 8))
  fake = rng.normal(size=(250, 8)) + 100.0
  assert metrics.precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_mode_dropping_lowers_recall_only():
  rng = np.random.default_rng(10)
  centers = np.array([[0.0, 0.0], [20.0, 0.0]])
  real = np.concatenate([rng.normal(size=(300, 2)) + c for c in centers])
  fake = rng.normal(size=(600, 2)) + centers[0]  # covers one of two modes
  precision, recall = metrics.precision_recall(real, fake, k=3)
  assert precision > 0.95
  assert 0.4 < recall < 0.6


def test_precision_recall_batching_does_not_change_result():
  rng = np.random.default_rng(11)
  real = rng.normal(size=(123, 5))
  fake = rng.normal(size=(97, 5)) * 1.3 + 0.2
  full = metrics.precision_recall(real, fake, k=4)
  blocked = metrics.precision_recall(real, fake, k=4, batch_size=7)
  assert full == blocked


def test_precision_recall_matches_brute_force():
  rng = np.random.default_rng(12)
  real = rng.normal(size=(60, 3))
  fake = rng.normal(size=(50, 3)) + 0.5
  k = 3

  def radii(x):
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return np.sort(d, axis=1)[:, k]

  d_fr = np.linalg.norm(fake[:, None] - real[None], axis=-1)
  precision = np.mean(np.any(d_fr <= radii(real)[None], axis=1))
  recall = np.mean(np.any(d_fr.T <= radii(fake)[None], axis=1))
  got = metrics.precision_recall(real, fake, k=k)
  assert got == pytest.approx((precision, recall))


def test_precision_recall_rejects_bad_k():
  x = np.zeros((3, 2))
  with pytest.raises(ValueError, match="k="):
    metrics.precision_recall(x, x, k=3)
