"""Sample-quality metrics on feature vectors: FID, Inception Score, precision/recall.

Everything here is plain numpy/scipy in float64 and knows nothing about the feature
network: callers pass pool features (Inception-v3 2048-d, or the small classifier's
penultimate layer for datasets without Inception weights) and logits.

Protocol (METHOD.md section 8): samples are quantised to uint8 with `quantize_uint8`
before any feature extraction, so generated and reference images go through exactly
the same pixel pipeline.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import scipy.special

__all__ = [
    "quantize_uint8",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "precision_recall",
]

# Largest pairwise-distance block held in memory at once (float64 elements): 2**24
# elements is 128 MiB, so 10k x 10k (or 50k x 50k) comparisons stream in row blocks.
_MAX_BLOCK_ELEMENTS = 1 << 24


def quantize_uint8(images) -> np.ndarray:
  """Quantises float images in [-1, 1] to uint8 as the standard FID protocol does.

  u = round(clip((clip(x, -1, 1) + 1) * 127.5, 0, 255)), so -1 -> 0, 0 -> 128
  (127.5 rounds half to even), 1 -> 255.

  Args:
    images: float array of any shape (e.g. `[n, H, W, C]`), nominally in [-1, 1];
      values outside are clipped. A JAX array is accepted and copied to host.

  Returns:
    uint8 numpy array of the same shape.
  """
  x = np.asarray(images)
  # Integer input is almost surely already-quantised pixels; refuse rather than
  # clip 0..255 to 1. (bfloat16 from JAX is not np.floating, so test for ints.)
  if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
    raise TypeError(
        f"quantize_uint8 expects float images in [-1, 1], got dtype {x.dtype}")
  u = (np.clip(x.astype(np.float64), -1.0, 1.0) + 1.0) * 127.5
  return np.clip(np.round(u), 0, 255).astype(np.uint8)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of a set of feature vectors (the FID reference statistics).

  mu = (1/n) sum_i f_i,   sigma = 1/(n-1) sum_i (f_i - mu)(f_i - mu)^T
  (unbiased, as `np.cov` and pytorch-fid use).

  Args:
    features: `[n, d]` array, n >= 2.

  Returns:
    (mu `[d]`, sigma `[d, d]`), both float64.
  """
  f = np.asarray(features, dtype=np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(
        f"features must have shape [n, d] with n >= 2, got {f.shape}")
  mu = f.mean(axis=0)
  sigma = np.cov(f, rowvar=False)
  return mu, np.atleast_2d(sigma)


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6,
                     imag_atol: float = 1e-3) -> float:
  """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

  d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}).

  Follows pytorch-fid: the matrix square root is `scipy.linalg.sqrtm` of the product;
  if that is not finite (singular product, e.g. fewer samples than dimensions) it is
  recomputed as ((sigma1 + eps I)(sigma2 + eps I))^{1/2}. The square root of a product
  of PSD matrices has real spectrum, so a complex result is only rounding noise: its
  real part is kept after checking that the diagonal's imaginary part is below
  `imag_atol`.

  Args:
    mu1: `[d]` mean of the first set (e.g. generated samples).
    sigma1: `[d, d]` covariance of the first set.
    mu2: `[d]` mean of the second set (e.g. the training set reference).
    sigma2: `[d, d]` covariance of the second set.
    eps: diagonal offset used only when the plain square root is not finite.
    imag_atol: largest tolerated |Im| on the diagonal of the square root.

  Returns:
    The squared Fréchet distance (the number reported as "FID") as a Python float.

  Raises:
    ValueError: on shape mismatch or a significant imaginary component.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,):
    raise ValueError(f"mean shapes differ: {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(
        f"covariances must be [{d}, {d}], got {sigma1.shape} and {sigma2.shape}")

  diff = mu1 - mu2
  with warnings.catch_warnings():
    # A singular product is handled below by the eps fallback; the warning that
    # scipy emits for it would only be noise.
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
      offset = np.eye(d) * eps
      covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if not np.isfinite(covmean).all():
    raise ValueError("sqrtm(sigma1 @ sigma2) is not finite even with eps offset")
  if np.iscomplexobj(covmean):
    max_imag = np.max(np.abs(np.diagonal(covmean).imag))
    if max_imag > imag_atol:
      raise ValueError(
          f"imaginary component {max_imag:.3g} in sqrtm(sigma1 @ sigma2) exceeds "
          f"imag_atol={imag_atol}")
    covmean = covmean.real
  fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
  return float(fd)


def inception_score(logits, *, num_splits: int = 10) -> tuple[float, float]:
  """Inception Score exp(E_x KL(p(y|x) || p(y))) over `num_splits` disjoint splits.

  For each split s of the samples (contiguous, sizes as in Salimans et al. 2016's
  code: rows [i n / S, (i+1) n / S)):
    p(y) = mean_{x in s} p(y|x),
    IS_s = exp(mean_{x in s} sum_y p(y|x) (log p(y|x) - log p(y))).
  Returns the mean and (population) standard deviation of IS_s over splits.

  p(y|x) = softmax(logits) is computed in float64 via log-softmax. For the standard
  Inception Score the logits are the 1008-way Inception-v3 fc output without its
  bias (see `inception.inception_features_and_logits`).

  Args:
    logits: `[n, K]` unnormalised class scores.
    num_splits: number of splits S (10 by convention); needs n >= S.

  Returns:
    (mean, std) as Python floats. Bounds: 1 <= IS_s <= K.
  """
  z = np.asarray(logits, dtype=np.float64)
  if z.ndim != 2:
    raise ValueError(f"logits must be [n, K], got shape {z.shape}")
  n = z.shape[0]
  if num_splits < 1 or n < num_splits:
    raise ValueError(
        f"need 1 <= num_splits <= n, got num_splits={num_splits}, n={n}")
  log_p = z - scipy.special.logsumexp(z, axis=1, keepdims=True)  # [n, K]
  scores = []
  for i in range(num_splits):
    part = log_p[i * n // num_splits:(i + 1) * n // num_splits]
    p = np.exp(part)
    log_py = np.log(p.mean(axis=0, keepdims=True))  # [1, K]
    # 0 * log 0 := 0: where p(y|x) underflows to 0, the summand is dropped.
    kl = np.sum(np.where(p > 0, p * (part - log_py), 0.0), axis=1)
    scores.append(np.exp(kl.mean()))
  scores = np.asarray(scores)
  return float(scores.mean()), float(scores.std())


def _squared_norms(x: np.ndarray) -> np.ndarray:
  return np.einsum("ij,ij->i", x, x)


def _row_block(n_cols: int, batch_size: int | None) -> int:
  if batch_size is not None:
    return max(1, int(batch_size))
  return max(1, _MAX_BLOCK_ELEMENTS // max(1, n_cols))


def _pairwise_sq_dists(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray,
                       b_sq: np.ndarray) -> np.ndarray:
  """||a_i - b_j||^2 = ||a_i||^2 + ||b_j||^2 - 2 a_i.b_j, clipped at 0. `[na, nb]`."""
  d2 = a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
  return np.maximum(d2, 0.0)


def _knn_sq_radii(x: np.ndarray, k: int, batch_size: int | None) -> np.ndarray:
  """Squared distance from each row of x to its k-th nearest other row. `[n]`."""
  n = x.shape[0]
  x_sq = _squared_norms(x)
  radii = np.empty(n, dtype=np.float64)
  block = _row_block(n, batch_size)
  for start in range(0, n, block):
    stop = min(start + block, n)
    d2 = _pairwise_sq_dists(x[start:stop], x_sq[start:stop], x, x_sq)
    # The point itself (distance ~0) is the 0-th smallest, so the k-th smallest
    # counting from 0 is the k-th nearest neighbour excluding self.
    radii[start:stop] = np.partition(d2, k, axis=1)[:, k]
  return radii


def _inside_manifold(queries: np.ndarray, support: np.ndarray,
                     support_sq_radii: np.ndarray, batch_size: int | None) -> np.ndarray:
  """For each query q: exists j with ||q - s_j||^2 <= r_j^2. Bool `[n_queries]`."""
  q_sq = _squared_norms(queries)
  s_sq = _squared_norms(support)
  inside = np.empty(queries.shape[0], dtype=bool)
  block = _row_block(support.shape[0], batch_size)
  for start in range(0, queries.shape[0], block):
    stop = min(start + block, queries.shape[0])
    d2 = _pairwise_sq_dists(queries[start:stop], q_sq[start:stop], support, s_sq)
    inside[start:stop] = np.any(d2 <= support_sq_radii[None, :], axis=1)
  return inside


def precision_recall(real_features, fake_features, *, k: int = 3,
                     batch_size: int | None = None) -> tuple[float, float]:
  """Improved precision and recall with k-NN manifolds (Kynkäänniemi et al., 2019).

  Each set Phi is approximated by the union of balls B(phi, r_k(phi)), where r_k(phi)
  is the distance from phi to its k-th nearest neighbour in Phi (itself excluded):
    manifold(Phi) = U_{phi in Phi} B(phi, r_k(phi)).
    precision = (1/|fake|) sum_{f in fake} 1[f in manifold(real)],
    recall    = (1/|real|) sum_{r in real} 1[r in manifold(fake)].
  Precision measures fidelity (samples land on the data manifold); recall measures
  coverage/diversity (the data manifold is covered by samples).

  Distances are computed in float64 row blocks so memory stays O(block x n)
  (10k x 10k x 512 features fit in ~128 MiB per block).

  Args:
    real_features: `[n_real, d]` features of reference images.
    fake_features: `[n_fake, d]` features of generated images.
    k: neighbourhood size (3 in the paper); needs k < min(n_real, n_fake).
    batch_size: rows per distance block; default picks ~2**24 elements per block.

  Returns:
    (precision, recall) as Python floats in [0, 1].
  """
  real = np.asarray(real_features, dtype=np.float64)
  fake = np.asarray(fake_features, dtype=np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(
        f"features must be [n, d] with equal d, got {real.shape} and {fake.shape}")
  if not 1 <= k < min(real.shape[0], fake.shape[0]):
    raise ValueError(
        f"need 1 <= k < min(n_real, n_fake), got k={k}, n_real={real.shape[0]}, "
        f"n_fake={fake.shape[0]}")
  real_r2 = _knn_sq_radii(real, k, batch_size)
  fake_r2 = _knn_sq_radii(fake, k, batch_size)
  precision = _inside_manifold(fake, real, real_r2, batch_size).mean()
  recall = _inside_manifold(real, fake, fake_r2, batch_size).mean()
  return float(precision), float(recall)
