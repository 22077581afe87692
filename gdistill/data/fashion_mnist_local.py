"""A TFDS builder that prepares Fashion-MNIST from local IDX files, offline.

Debian's ``dataset-fashion-mnist`` package installs the four original IDX
files (re-compressed, so TFDS's own ``fashion_mnist`` builder rejects them by
checksum) under ``/usr/share/datasets/fashion-mnist``. This builder reads them
directly and writes an ``array_record`` TFDS dataset that
``tfds.data_source`` can open without TensorFlow.

Preparation goes through ``DatasetBuilder.download_and_prepare``, which
writes into a temporary ``incomplete.*`` directory and renames it into place
only on success, so an interrupted preparation never looks prepared. A file
lock in the data directory serialises concurrent preparations (e.g. several
processes of one job on a shared filesystem).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from gdistill.data import tfds_scratch

NAME = 'gdistill_fashion_mnist'
DEFAULT_SOURCE_DIR = '/usr/share/datasets/fashion-mnist'
CLASS_NAMES = (
    'T-shirt/top',
    'Trouser',
    'Pullover',
    'Dress',
    'Coat',
    'Sandal',
    'Shirt',
    'Sneaker',
    'Bag',
    'Ankle boot',
)
IMAGE_SHAPE = (28, 28, 1)
# split name -> (images file, labels file, number of examples)
SPLIT_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', 60000),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz', 10000),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049


def required_files() -> list[str]:
  """Returns the file names that must exist in the source directory."""
  return [name for images, labels, _ in SPLIT_FILES.values()
          for name in (images, labels)]


def missing_files(source_dir: str) -> list[str]:
  """Returns the required IDX files absent from ``source_dir``."""
  return [name for name in required_files()
          if not os.path.isfile(os.path.join(source_dir, name))]


def _read_idx(path: str, magic: int) -> np.ndarray:
  """Reads one gzip-compressed IDX file (big-endian header, uint8 payload).

  Args:
    path: Path of the ``.gz`` IDX file.
    magic: Expected magic number (2051 for images, 2049 for labels).

  Returns:
    A uint8 array of shape ``[n]`` (labels) or ``[n, rows, cols]`` (images).

  Raises:
    ValueError: If the header or payload size does not match.
  """
  with gzip.open(path, 'rb') as f:
    data = f.read()
  ndim = 1 if magic == _IDX_LABELS_MAGIC else 3
  header = np.frombuffer(data, dtype='>i4', count=1 + ndim)
  if int(header[0]) != magic:
    raise ValueError(f'{path}: IDX magic {int(header[0])}, expected {magic}.')
  shape = tuple(int(d) for d in header[1:])
  payload = np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + ndim))
  if payload.size != int(np.prod(shape)):
    raise ValueError(f'{path}: {payload.size} bytes of data for shape {shape}.')
  return payload.reshape(shape)


def read_split(source_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split's raw arrays from the IDX files.

  Args:
    source_dir: Directory holding the four Fashion-MNIST ``.gz`` IDX files.
    split: ``'train'`` or ``'test'``.

  Returns:
    ``(images uint8 [n, 28, 28, 1], labels uint8 [n])``.

  Raises:
    ValueError: If the files are malformed or their counts disagree.
  """
  images_file, labels_file, num_examples = SPLIT_FILES[split]
  images = _read_idx(os.path.join(source_dir, images_file), _IDX_IMAGES_MAGIC)
  labels = _read_idx(os.path.join(source_dir, labels_file), _IDX_LABELS_MAGIC)
  if images.shape != (num_examples, 28, 28) or labels.shape != (num_examples,):
    raise ValueError(
        f'{source_dir}: {split} images {images.shape} / labels {labels.shape},'
        f' expected {num_examples} examples of 28x28.')
  return images[..., None], labels


def encode_png(image: np.ndarray) -> bytes:
  """Encodes a ``[H, W, 1]`` uint8 image as PNG bytes with Pillow.

  TFDS's ``Image`` feature encodes numpy arrays with ``tf.image.encode_png``,
  which needs TensorFlow; already-encoded bytes are stored as they are.
  """
  buffer = io.BytesIO()
  PIL.Image.fromarray(image[..., 0], mode='L').save(buffer, format='png')
  return buffer.getvalue()


class GdistillFashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST prepared from local IDX files (no download, no TF)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Fashion-MNIST from local (Debian) IDX files.'}

  def __init__(self, *, source_dir: str = DEFAULT_SOURCE_DIR, **kwargs: Any):
    """Initialises the builder.

    Args:
      source_dir: Directory holding the four ``*-ubyte.gz`` IDX files.
      **kwargs: Passed to ``tfds.core.GeneratorBasedBuilder`` (``data_dir``,
        ``file_format``, ...).
    """
    self._source_dir = os.fspath(source_dir)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    """Returns the dataset metadata (features, class names, no shuffling)."""
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Fashion-MNIST (Zalando's 28x28 grayscale article images, 60000"
            ' train / 10000 test, 10 classes), read from local IDX files.'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=IMAGE_SHAPE),
            'label': tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        }),
        supervised_keys=('image', 'label'),
        # Keep the IDX order: example i of a split is image i of its file.
        disable_shuffling=True,
        homepage='https://github.com/zalandoresearch/fashion-mnist',
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[Any]]:
    """Returns one example generator per split, reading ``source_dir``."""
    del dl_manager  # Everything is local.
    missing = missing_files(self._source_dir)
    if missing:
      raise FileNotFoundError(
          f'Fashion-MNIST IDX files {missing} not found in {self._source_dir}.')
    return {split: self._generate_examples(split) for split in SPLIT_FILES}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    """Yields ``(index, {'image': PNG bytes, 'label': int})`` in IDX order."""
    images, labels = read_split(self._source_dir, split)
    for index in range(images.shape[0]):
      yield index, {'image': encode_png(images[index]),
                    'label': int(labels[index])}


def make_builder(data_dir: str | None,
                 source_dir: str = DEFAULT_SOURCE_DIR) -> GdistillFashionMnist:
  """Returns the builder writing/reading array_record files under ``data_dir``."""
  with tfds_scratch.removed():
    return GdistillFashionMnist(
        data_dir=data_dir, source_dir=source_dir, file_format='array_record')


@contextlib.contextmanager
def _prepare_lock(builder: tfds.core.DatasetBuilder) -> Iterator[None]:
  """Holds an exclusive file lock next to the dataset's directory."""
  lock_dir = builder.data_path.parent  # <data_dir>/gdistill_fashion_mnist
  lock_dir.mkdir(parents=True, exist_ok=True)
  with open(os.fspath(lock_dir / '.prepare.lock'), 'w') as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


def prepare(data_dir: str | None,
            source_dir: str = DEFAULT_SOURCE_DIR) -> GdistillFashionMnist:
  """Prepares the dataset into ``data_dir`` once; later calls reuse it.

  Never touches the network: GCS lookups are disabled and the generator only
  reads ``source_dir``.

  Args:
    data_dir: TFDS data directory (``None``: TFDS's default).
    source_dir: Directory holding the four IDX ``.gz`` files.

  Returns:
    A prepared builder.
  """
  builder = make_builder(data_dir, source_dir)
  if builder.is_prepared():
    return builder
  with _prepare_lock(builder):
    builder = make_builder(data_dir, source_dir)  # Another process may have won.
    if not builder.is_prepared():
      builder.download_and_prepare(
          file_format='array_record',
          download_config=tfds.download.DownloadConfig(
              try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP),
      )
  return builder
