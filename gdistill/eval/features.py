"""The feature network of the sweep and the cached feature statistics of real data.

Two feature networks (METHOD.md section 8):
  * ``inception``: the FID Inception-v3 (2048-d pool features, 1008 logits), weights
    from a local file; the numbers are the literature's FID / IS.
  * ``classifier``: for MNIST-like data, a small classifier that gdistill trains on the
    training split (test accuracy printed and stored with it); FID / IS are then
    computed in *its* feature space and are not comparable to Inception FID / IS.

Real-data statistics (mean and covariance of the features, plus the features and
logits of a fixed random subset for precision/recall and the floor) are computed once
per (feature network, split) and cached in ``DIR/eval/`` next to the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from typing import Callable, Optional

import jax
import numpy as np

from gdistill import storage
from gdistill.config_validation import ConfigError
from gdistill.eval import classifier as classifier_lib
from gdistill.eval import inception as inception_lib
from gdistill.metric_writer import log

_CHUNK = 10_000  # images per source read / feature pass


@dataclasses.dataclass
class FeatureNet:
  """``fn(images uint8 [n, H, W, C]) -> (features [n, d], logits [n, K])`` and its identity.

  Attributes:
    kind: ``classifier`` or ``inception``.
    fn: the batched, jitted feature function.
    info: what the protocol records (description, file, test accuracy, comparability).
    fingerprint: changes whenever the features would (weights digest); cached
      statistics and report rows are only reused under the same fingerprint.
  """
  kind: str
  fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
  info: dict
  fingerprint: str


def _digest_tree(tree) -> str:
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(tree)):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(str((a.shape, a.dtype)).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def all_images(source) -> tuple[np.ndarray, np.ndarray]:
  """Every image (uint8 [n, H, W, C]) and label of an ImageSource."""
  batch = source.get(np.arange(source.num_examples))
  return batch['image'], batch['label']


def classifier_net(*, path: str, train_source, test_source, steps: int, batch_size: int,
                   learning_rate: float, seed: int, retrain_if_stale: bool) -> FeatureNet:
  """gdistill's own classifier: loaded from ``path``, or trained and saved there.

  A file at ``path`` whose training settings (steps, batch size, learning rate, seed) differ
  is retrained when ``retrain_if_stale`` (the workdir's own file), used as-is
  otherwise (a classifier shared between runs, so that their numbers compare).
  """
  want = {'dataset': train_source.name, 'image_shape': [int(s) for s in train_source.image_shape],
          'num_classes': int(train_source.num_classes)}
  settings = {'steps': steps, 'batch_size': batch_size, 'learning_rate': learning_rate,
              'seed': seed,
              'train_split': train_source.split, 'test_split': test_source.split}
  params = meta = None
  if storage.isfile(path):
    params, meta = classifier_lib.load_classifier(path)
    mismatch = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if mismatch:
      raise ConfigError(f'eval.classifier_path={path!r}: classifier for {mismatch} '
                        f'(file value, this run\'s value) does not fit this dataset')
    if retrain_if_stale and any(meta.get(k) != v for k, v in settings.items()):
      log(f'eval: classifier at {path} was trained with other settings; retraining')
      params = meta = None
  if params is None:
    log(f'eval: training the feature classifier on {train_source.name}:{train_source.split} '
        f'({steps} steps of {batch_size})')
    train_x, train_y = all_images(train_source)
    test_x, test_y = all_images(test_source)
    params, accuracy = classifier_lib.train_classifier(
        train_x, train_y, test_x, test_y, steps=steps, batch_size=batch_size, seed=seed,
        learning_rate=learning_rate, num_classes=train_source.num_classes)
    meta = dict(want, **settings, test_accuracy=accuracy)
    if jax.process_index() == 0:
      classifier_lib.save_classifier(path, params, meta)
      log(f'eval: wrote {path}')
  accuracy = float(meta['test_accuracy'])
  log(f'eval: feature classifier test accuracy {accuracy:.4f} '
      f'({meta.get("test_split", "test")} split)')
  fn = classifier_lib.ClassifierFeatures(params, num_classes=meta['num_classes'])
  info = {'name': 'classifier', 'path': storage.absolute(path), 'test_accuracy': accuracy,
          'test_split': meta.get('test_split'), 'train_split': meta.get('train_split'),
          'steps': meta.get('steps'), 'feature_dim': classifier_lib.FeatureClassifier(
              num_classes=meta['num_classes']).feature_dim,
          'description': (f'gdistill\'s own {meta["dataset"]} classifier '
                          f'(penultimate features for FID and precision/recall, logits '
                          f'for IS; test accuracy {accuracy:.4f})'),
          'comparable_to_inception_fid': False}
  return FeatureNet('classifier', fn, info, f'classifier-{_digest_tree(params)}')


def inception_net(*, weights: str, batch_size: int = 100) -> FeatureNet:
  """The FID Inception-v3 from a local weights file (checksum-verified for .pth)."""
  try:
    variables = inception_lib.load_inception_params(weights)
  except (FileNotFoundError, ValueError, KeyError, ImportError) as e:
    raise ConfigError(f'eval.inception_weights={weights!r}: {e}') from e

  def fn(images):
    return inception_lib.inception_features_and_logits(variables, images,
                                                       batch_size=batch_size)
  info = {'name': 'inception', 'path': os.path.abspath(weights),
          'feature_dim': inception_lib.POOL_FEATURES,
          'description': ('FID Inception-v3 (pt_inception-2015-12-05): pool3 features for '
                          'FID and precision/recall, 1008 unbiased logits for IS'),
          'comparable_to_inception_fid': True}
  return FeatureNet('inception', fn, info, f'inception-{_digest_tree(variables)}')


def subset_indices(num_examples: int, size: int, seed: int) -> np.ndarray:
  """A fixed random subset (sorted) of ``size`` example indices."""
  rng = np.random.default_rng([seed, 0x5EED])
  return np.sort(rng.choice(num_examples, size=min(size, num_examples), replace=False))


def split_statistics(net: FeatureNet, source, *, cache_path: str, subset_size: int,
                     max_examples: int = 0, seed: int = 0) -> dict:
  """Feature statistics of one real split, computed once and cached in ``cache_path``.

  mu = mean f, sigma = cov f (unbiased), streamed over chunks in float64, over the
  first ``max_examples`` examples of the split (0: all).

  Returns:
    {'mu' [d], 'sigma' [d, d], 'n': examples used, 'subset_features' [m, d],
     'subset_logits' [m, K]}: the subset is ``subset_indices(n, subset_size, seed)``.
  """
  n = source.num_examples if not max_examples else min(max_examples, source.num_examples)
  fingerprint = json.dumps({'net': net.fingerprint, 'data': source.name, 'split': source.split,
                            'n': n, 'subset': subset_size, 'seed': seed}, sort_keys=True)
  if storage.isfile(cache_path):
    with np.load(io.BytesIO(storage.read_bytes(cache_path)), allow_pickle=False) as f:
      if str(f['fingerprint']) == fingerprint:
        return {k: f[k] for k in ('mu', 'sigma', 'subset_features', 'subset_logits')} | {
            'n': int(f['n'])}
  log(f'eval: feature statistics of {source.name}:{source.split} ({n} images)')
  s1 = s2 = None
  for start in range(0, n, _CHUNK):
    feats, _ = net.fn(source.get(np.arange(start, min(start + _CHUNK, n)))['image'])
    f = feats.astype(np.float64)
    s1 = f.sum(0) if s1 is None else s1 + f.sum(0)
    s2 = f.T @ f if s2 is None else s2 + f.T @ f
  mu = s1 / n
  sigma = (s2 - n * np.outer(mu, mu)) / (n - 1)
  sub_f, sub_l = net.fn(source.get(subset_indices(n, subset_size, seed))['image'])
  out = {'mu': mu, 'sigma': sigma, 'n': n, 'subset_features': sub_f, 'subset_logits': sub_l}
  if jax.process_index() == 0:
    storage.write_with(cache_path, lambda f: np.savez(f, fingerprint=np.asarray(fingerprint),
                                                      **out))
  return out


def make_feature_net(*, kind: str, eval_dir: str, train_source, test_source,
                     classifier_path: str, classifier_steps: int, classifier_batch_size: int,
                     classifier_learning_rate: float, inception_weights: str, seed: int,
                     inception_batch_size: Optional[int] = None) -> FeatureNet:
  """The feature network ``kind`` (``classifier`` or ``inception``, not ``auto``)."""
  if kind == 'inception':
    return inception_net(weights=inception_weights, batch_size=inception_batch_size or 100)
  default_path = os.path.join(eval_dir, 'classifier.npz')
  return classifier_net(path=classifier_path or default_path, train_source=train_source,
                        test_source=test_source, steps=classifier_steps,
                        batch_size=classifier_batch_size,
                        learning_rate=classifier_learning_rate, seed=seed,
                        retrain_if_stale=not classifier_path)
