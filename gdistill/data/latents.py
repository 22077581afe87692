"""A latent run's training data: the split encoded once by the codec, stored in the workdir.

Measured (benchmarks/latent_encoding.py --quick, configs/fashion_mnist_latent.py, 2-core
CPU shared with a training run, 2026-12-03): encoding a batch of 64 takes 0.125 s beside
a 0.50 / 0.75 / 0.87 s teacher / stage-1 / stage-2 step on latents (the autoencoder's
encoder outweighs the small latent U-Net), 18 minutes over the config's steps; encoding
the 60000 training images once takes about 2 minutes and 45 MiB. (Encoding inside the
step measured the same: 0.20 / 0.25 / 0.05 s more per step.) So a latent run encodes its
training split on its first start
(``WORKDIR/latents/<split>.npy``, with a JSON sidecar naming the codec file's sha256, the
dataset and split), and every later start, resume or phase reads that file; the steps
train on latents as a pixel run's train on images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time

import grain
import jax
import numpy as np

from gdistill import storage
from gdistill.data.sources import _Arrays
from gdistill.metric_writer import log

LATENTS_DIR = 'latents'
ENCODE_BATCH = 500


@dataclasses.dataclass
class LatentSource:
  """The training split as the networks see it: ``get`` / ``examples`` give
  ``{'image': float32 latents [h, w, c], 'label': int32}`` (``to_model_input`` passes
  float latents through); everything else is the image source's."""
  pixels: object  # the ImageSource
  latents: np.ndarray
  labels: np.ndarray

  def __getattr__(self, name):  # name, split, num_examples, num_classes, class_names
    return getattr(self.pixels, name)

  @property
  def image_shape(self) -> tuple:
    return tuple(self.latents.shape[1:])

  def get(self, indices) -> dict:
    indices = np.asarray(indices, np.int64)
    return {'image': self.latents[indices], 'label': self.labels[indices]}

  def examples(self) -> grain.MapDataset:
    return grain.MapDataset.source(_Arrays(self.latents, self.labels))


def _identity(codec) -> dict:
  """What the stored latents depend on: the codec's file (its sha256) and description."""
  path = getattr(codec, 'path', '')
  sha = hashlib.sha256(storage.read_bytes(path)).hexdigest() if path else ''
  return {'codec': codec.describe(), 'codec_sha256': sha}


def encode_split(source, codec, *, workdir: str, codec_params=None) -> LatentSource:
  """The latents of ``source`` under ``codec``: read from the workdir when stored there for
  this codec, else encoded (batches of ``ENCODE_BATCH``, jitted) and stored."""
  base = os.path.join(workdir, LATENTS_DIR, source.split.replace('/', '_'))
  array_path, info_path = base + '.npy', base + '.json'
  want = dict(_identity(codec), dataset=source.name, split=source.split,
              num_examples=int(source.num_examples), latent_shape=list(codec.model_shape()))
  labels = np.asarray(source.get(np.arange(source.num_examples))['label'], np.int32)
  if storage.isfile(info_path) and storage.isfile(array_path):
    try:
      have = json.loads(storage.read_text(info_path))
      if have == want:
        latents = np.load(io.BytesIO(storage.read_bytes(array_path)))
        if latents.shape == (source.num_examples, *codec.model_shape()):
          log(f'latents: read {source.name}:{source.split} ({latents.shape[0]} images) '
              f'from {array_path}')
          return LatentSource(source, latents, labels)
    except (OSError, ValueError):
      pass  # unreadable or from another codec: encoded again below
  t0 = time.perf_counter()
  params = codec.params if codec_params is None else codec_params
  encode = jax.jit(codec.encode_with)
  out = []
  for start in range(0, source.num_examples, ENCODE_BATCH):
    idx = np.arange(start, min(start + ENCODE_BATCH, source.num_examples))
    x = source.get(idx)['image'].astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    out.append(np.asarray(jax.device_get(encode(params, x)), np.float32))
  latents = np.concatenate(out)
  if jax.process_index() == 0:
    storage.makedirs(os.path.dirname(array_path))
    storage.write_with(array_path, lambda f: np.save(f, latents))
    storage.write_text(info_path, json.dumps(want, indent=1))
  log(f'latents: encoded {source.name}:{source.split} ({latents.shape[0]} images -> '
      f'{list(latents.shape[1:])}) in {time.perf_counter() - t0:.0f}s; stored in {array_path}')
  return LatentSource(source, latents, labels)
