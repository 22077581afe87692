"""A split decoded into memory, kept beside its prepared TFDS files for the next process.

Decoding Fashion-MNIST's 60,000 PNG-encoded training images through TFDS takes 12-30 s on
the 2-core CPU (PIL, one image at a time, bound by the GIL); every gdistill command that
trains or evaluates paid it again. The decoded arrays (uint8, exactly what decoding
returns) are saved once as ``gdistill-decoded-<split>.npz`` in the dataset's version
directory, which a later process reads in a fraction of a second.

A cache file holds the key it was made for: the split, the image shape, the feature keys
and, for every file the split reads, its name, the records read, its size and its
modification time. A file whose key differs (the data was prepared again), that cannot be
read or that holds arrays of other shapes is ignored and replaced. Only local data
directories are cached; one that cannot be written (read-only, full) is simply not cached.
``GDISTILL_DECODED_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from typing import Optional, Sequence

import numpy as np

from gdistill import storage

ENV = 'GDISTILL_DECODED_CACHE'


def enabled() -> bool:
  return os.environ.get(ENV, '1').strip().lower() not in ('0', 'false', 'no', 'off')


def path_and_key(data_dir: str, split: str, image_shape: Sequence[int], image_key: str,
                 label_key: str, file_instructions) -> tuple[Optional[str], str]:
  """Where the split's cache file lives (None: not cached) and the key it must hold."""
  if not enabled() or not data_dir or not os.path.isdir(data_dir):
    return None, ''
  files = []
  for fi in file_instructions:
    try:
      st = os.stat(fi.filename)
    except OSError:
      return None, ''
    files.append([os.path.basename(fi.filename), int(fi.skip), int(fi.take), st.st_size,
                  st.st_mtime_ns])
  key = json.dumps({'split': split, 'image_shape': [int(d) for d in image_shape],
                    'image_key': image_key, 'label_key': label_key, 'files': files},
                   sort_keys=True)
  name = re.sub(r'[^A-Za-z0-9._+-]+', '_', split)
  return os.path.join(data_dir, f'gdistill-decoded-{name}.npz'), key


def load(path: Optional[str], key: str, num_examples: int,
         image_shape: Sequence[int]) -> Optional[tuple[np.ndarray, np.ndarray]]:
  """``(images, labels)`` from the cache file if it holds ``key`` and the right shapes."""
  if path is None or not os.path.isfile(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      if str(f['key']) != key:
        return None
      images, labels = f['images'], f['labels']
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    logging.info('decoded-data cache %s unreadable (%s); decoding again', path, e)
    return None
  if (images.dtype != np.uint8 or images.shape != (num_examples, *image_shape)
      or labels.dtype != np.int32 or labels.shape != (num_examples,)):
    return None
  return images, labels


def save(path: Optional[str], key: str, images: np.ndarray, labels: np.ndarray) -> None:
  """Writes the cache file atomically; a directory that cannot take it is left alone."""
  if path is None:
    return
  try:  # one temporary name per process: two commands may decode the split at once
    storage.write_with(path, lambda f: np.savez(f, images=images, labels=labels,
                                                key=np.array(key)),
                       tmp_suffix=f'.tmp{os.getpid()}')
  except OSError as e:
    logging.info('decoded-data cache not written to %s (%s)', path, e)
