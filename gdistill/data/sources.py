"""Image classification data sources backed by TFDS, without TensorFlow.

``ImageSource.examples()`` is a split as a Grain dataset (the training
pipeline, ``gdistill.data.pipeline``, builds on it).

``open_source`` opens any prepared TFDS image classification dataset
(``cifar10``, ``imagenet_resized/64x64``, ``mnist``, ...) through TFDS's
random-access ``array_record`` data sources, and prepares Fashion-MNIST
offline from Debian's ``dataset-fashion-mnist`` files when TFDS's own copy is
not there. It never downloads unless asked to (``download=True``): a missing
dataset is a one-line ``DataError`` within a fraction of a second, instead of
TFDS's ~200 s of offline download retries.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
import os
import threading
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from gdistill.data import decoded_cache
from gdistill.data import fashion_mnist_local
from gdistill.data import tfds_scratch

DEFAULT_FASHION_MNIST_DIR = fashion_mnist_local.DEFAULT_SOURCE_DIR
# Datasets whose decoded images take less than this are decoded into memory.
IN_MEMORY_MAX_BYTES = 2 * 1024**3
_LOAD_CHUNK = 10_000
_LOAD_THREADS = 4  # decoding threads of the in-memory load
_EXAMPLE_NAMES = ('cifar10', 'fashion_mnist', 'mnist', 'imagenet_resized/64x64')
_FASHION_NAMES = ('fashion_mnist', fashion_mnist_local.NAME)
_APT_FIX = 'sudo apt-get install dataset-fashion-mnist'
_DOWNLOAD_FIX = ('run with internet and --config.data.download=True, or point'
                 ' --config.data.data_dir at prepared TFDS data')


class DataError(ValueError):
  """A user-facing data configuration error with a one-line message."""


@dataclasses.dataclass
class ImageSource:
  """Random access to one split of an image classification dataset.

  Attributes:
    name: Dataset name as requested (e.g. ``'cifar10'``).
    split: Split name (e.g. ``'train'``, ``'test'``, ``'train[:90%]'``).
    num_examples: Number of examples in the split.
    image_shape: ``(H, W, C)`` of every image (``C`` is 1 for grayscale).
    num_classes: Number of label classes.
    class_names: Human-readable name of each class, indexed by label.
    data_source: The TFDS random-access data source the examples come from.
    in_memory: Whether the whole split is decoded into memory on first use
      (``open_source`` sets it when the decoded split is under
      ``IN_MEMORY_MAX_BYTES``); otherwise ``get`` and ``examples`` read and
      decode by index.
    image_key: Feature key of the images in the data source's examples.
    label_key: Feature key of the labels.
    cache_path: Where the decoded split is kept for the next process
      (``decoded_cache``; None: not kept).
    cache_key: What that file must hold to be used.
  """

  name: str
  split: str
  num_examples: int
  image_shape: tuple[int, int, int]
  num_classes: int
  class_names: list[str]
  data_source: Any = dataclasses.field(default=None, repr=False, compare=False)
  in_memory: bool = False
  image_key: str = 'image'
  label_key: str = 'label'
  cache_path: str | None = None
  cache_key: str = ''
  _images: np.ndarray | None = dataclasses.field(
      default=None, init=False, repr=False, compare=False)
  _labels: np.ndarray | None = dataclasses.field(
      default=None, init=False, repr=False, compare=False)
  _lock: threading.Lock = dataclasses.field(
      default_factory=threading.Lock, init=False, repr=False, compare=False)

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Returns the examples at ``indices`` (random access, for evaluation).

    Args:
      indices: 1-D integer array of example indices in ``[0, num_examples)``.

    Returns:
      ``{'image': uint8 [n, H, W, C], 'label': int32 [n]}``.

    Raises:
      IndexError: If an index is out of range.
      ValueError: If ``indices`` is not a 1-D integer array.
    """
    indices = self._check_indices(indices)
    if self.in_memory:
      self._ensure_loaded()
      return {'image': self._images[indices], 'label': self._labels[indices]}
    examples = self._decoded()
    return _stack([examples[int(i)] for i in indices], self.image_shape)

  def load(self) -> None:
    """Decodes the whole split into memory now (no-op if not ``in_memory``)."""
    if self.in_memory:
      self._ensure_loaded()

  def examples(self) -> grain.MapDataset:
    """The split as a Grain dataset: element ``i`` is example ``i``,
    ``{'image': uint8 [H, W, C], 'label': int32}``.

    An ``in_memory`` split is decoded once and read from its arrays; any other is
    read and decoded element by element from the TFDS data source, in whichever
    thread or worker process the Grain pipeline reads it.
    """
    if not self.in_memory:
      return self._decoded()
    self._ensure_loaded()
    return grain.MapDataset.source(_Arrays(self._images, self._labels))

  def _decoded(self) -> grain.MapDataset:
    """The TFDS data source's examples, decoded and reduced to image and label."""
    return grain.MapDataset.source(self.data_source).map(
        _Example(self.image_key, self.label_key, self.image_shape))

  def _check_indices(self, indices: np.ndarray) -> np.ndarray:
    """Validates ``indices``; returns them as int64."""
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (indices.size == 0 or
                                 np.issubdtype(indices.dtype, np.integer)):
      raise ValueError(
          f'indices must be a 1-D integer array, got {indices.dtype}'
          f' {indices.shape}.')
    if indices.size and (indices.min() < 0 or
                         indices.max() >= self.num_examples):
      raise IndexError(
          f'indices [{indices.min()}, {indices.max()}] out of range for'
          f' {self.name}:{self.split} with {self.num_examples} examples.')
    return indices.astype(np.int64, copy=False)

  def _ensure_loaded(self) -> None:
    """Decodes the whole split into ``_images``/``_labels`` once (Grain's reader
    threads decode in parallel)."""
    with self._lock:
      if self._images is not None:
        return
      cached = decoded_cache.load(self.cache_path, self.cache_key, self.num_examples,
                                  self.image_shape)
      if cached is not None:
        self._images, self._labels = cached
        return
      logging.info('Decoding %s:%s (%d examples) into memory.', self.name,
                   self.split, self.num_examples)
      chunks = self._decoded().batch(_LOAD_CHUNK).to_iter_dataset(
          grain.ReadOptions(num_threads=_LOAD_THREADS, prefetch_buffer_size=_LOAD_THREADS))
      images = np.empty((self.num_examples, *self.image_shape), np.uint8)
      labels = np.empty((self.num_examples,), np.int32)
      start = 0
      for chunk in chunks:
        stop = start + chunk['label'].shape[0]
        images[start:stop], labels[start:stop] = chunk['image'], chunk['label']
        start = stop
      self._images, self._labels = images, labels
      decoded_cache.save(self.cache_path, self.cache_key, images, labels)


@dataclasses.dataclass(frozen=True)
class _Example:
  """A TFDS example reduced to ``{'image': uint8 [H, W, C], 'label': int32}``
  (a class, not a closure: Grain pickles it into its worker processes)."""

  image_key: str
  label_key: str
  image_shape: tuple[int, int, int]

  def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    return {'image': np.asarray(example[self.image_key], np.uint8).reshape(self.image_shape),
            'label': np.int32(example[self.label_key])}


@dataclasses.dataclass(frozen=True)
class _Arrays:
  """Random access to decoded ``images [n, H, W, C]`` and ``labels [n]``."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return self.labels.shape[0]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {'image': self.images[index], 'label': self.labels[index]}


def _stack(examples: list[dict[str, np.ndarray]],
           image_shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
  """``{'image': uint8 [n, H, W, C], 'label': int32 [n]}`` of a list of examples."""
  images = np.empty((len(examples), *image_shape), np.uint8)
  labels = np.empty((len(examples),), np.int32)
  for row, example in enumerate(examples):
    images[row], labels[row] = example['image'], example['label']
  return {'image': images, 'label': labels}


def open_source(
    name: str,
    *,
    split: str,
    data_dir: str | None = None,
    download: bool = False,
    local_fashion_mnist_dir: str = DEFAULT_FASHION_MNIST_DIR,
) -> ImageSource:
  """Opens one split of a TFDS image classification dataset.

  Args:
    name: TFDS dataset name, optionally with config/version
      (``'cifar10'``, ``'imagenet_resized/64x64'``, ``'fashion_mnist'``).
    split: TFDS split (``'train'``, ``'test'``, ``'train[:1000]'``, ...).
    data_dir: TFDS data directory (``None``: TFDS's default, usually
      ``~/tensorflow_datasets``).
    download: Whether a missing dataset may be downloaded and prepared (as
      ``array_record``). Needs internet, and TensorFlow for TFDS's builders.
    local_fashion_mnist_dir: Directory of Debian's Fashion-MNIST IDX files,
      used to prepare ``fashion_mnist`` offline when TFDS's copy is missing.

  Returns:
    The ``ImageSource`` of that split.

  Raises:
    DataError: The name is unknown, the data is not prepared (and
      ``download`` is False), or the dataset is not image classification.
  """
  name = _check_name(name)
  _check_data_dir(data_dir)
  if name in _FASHION_NAMES:
    builder = _fashion_mnist_builder(name, data_dir, download,
                                     local_fashion_mnist_dir)
  else:
    builder = _prepared_builder(name, data_dir, download)
  return _make_source(name, split, builder)


def _check_name(name: str) -> str:
  """Checks that ``name`` names a registered TFDS builder; returns it stripped.

  Raises:
    DataError: If the name is empty, malformed, a community dataset (which
      needs the network) or not registered.
  """
  if not isinstance(name, str) or not name.strip():
    raise DataError(f'data.name={name!r} is empty; expected a TFDS dataset'
                    f' name such as {", ".join(_EXAMPLE_NAMES)}.')
  name = name.strip()
  try:
    dataset_name, _ = tfds.core.naming.parse_builder_name_kwargs(name)
  except ValueError as e:
    raise DataError(f'data.name={name!r} is not a valid TFDS name'
                    f' ({_first_line(e)}); expected e.g.'
                    f' {", ".join(_EXAMPLE_NAMES)}.') from None
  if dataset_name.namespace:
    raise DataError(f'data.name={name!r} names a community dataset'
                    f' ({dataset_name.namespace}:), which needs the network;'
                    f' expected a built-in TFDS name such as'
                    f' {", ".join(_EXAMPLE_NAMES)}.')
  registered = tfds.list_builders(with_community_datasets=False)
  if dataset_name.name not in registered:
    close = difflib.get_close_matches(dataset_name.name, registered, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ''
    raise DataError(f'data.name={name!r} is not a TFDS dataset{hint}; valid'
                    f' names include {", ".join(_EXAMPLE_NAMES)}.')
  return name


def _check_data_dir(data_dir: str | None) -> None:
  """Rejects a data_dir that exists but is not a directory."""
  if data_dir is not None and os.path.exists(data_dir) and not os.path.isdir(
      data_dir):
    raise DataError(f'data.data_dir={data_dir!r} is not a directory; expected'
                    ' a TFDS data directory (or leave it unset).')


def _first_line(error: BaseException) -> str:
  """Returns the first line of an exception's message (for one-line errors)."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _builder(name: str, data_dir: str | None,
             **kwargs: Any) -> tfds.core.DatasetBuilder:
  """Returns ``tfds.builder(name)`` (no I/O beyond reading metadata)."""
  try:
    with tfds_scratch.removed():
      return tfds.builder(name, data_dir=data_dir, **kwargs)
  except (ValueError, KeyError, TypeError, AssertionError) as e:
    raise DataError(f'data.name={name!r} cannot be built by TFDS:'
                    f' {_first_line(e)}') from None


def _random_access(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether the prepared data has a random-access (array_record) copy."""
  formats = set(builder.info.available_file_formats())
  return bool(formats & set(tfds.core.FileFormat.with_random_access()))


def _usable(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether the builder's data is prepared and readable without TF."""
  return builder.is_prepared() and _random_access(builder)


def _prepared_builder(name: str, data_dir: str | None,
                      download: bool) -> tfds.core.DatasetBuilder:
  """Returns the builder of prepared data, downloading only if allowed."""
  builder = _builder(name, data_dir)
  if _usable(builder):
    return builder
  if builder.is_prepared():
    raise DataError(
        f'data.name={name!r} is prepared in {builder.data_dir} as'
        f' {builder.info.file_format.value}, which has no random access'
        ' without TensorFlow; re-prepare it with file_format=array_record or'
        ' point --config.data.data_dir at an array_record copy.')
  if not download:
    raise DataError(
        f'data.name={name!r} is not prepared in data.data_dir='
        f'{_shown_dir(builder)!r}; {_DOWNLOAD_FIX}.')
  return _download(name, data_dir)


def _shown_dir(builder: tfds.core.DatasetBuilder) -> str:
  """The data_dir a builder looks in (TFDS's default when none was given)."""
  return os.fspath(builder.data_dir_root)


def _download(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Downloads and prepares ``name`` as array_record (needs TF and network)."""
  if importlib.util.find_spec('tensorflow') is None:
    raise DataError(
        f'data.download=True cannot prepare data.name={name!r}: TFDS needs'
        ' TensorFlow to download and prepare it (pip install tensorflow-cpu),'
        ' or prepare it elsewhere and point --config.data.data_dir at it.')
  builder = _builder(name, data_dir, file_format='array_record')
  builder.download_and_prepare(file_format='array_record')
  return _builder(name, data_dir)


def _fashion_mnist_builder(name: str, data_dir: str | None, download: bool,
                           local_dir: str) -> tfds.core.DatasetBuilder:
  """TFDS's prepared fashion_mnist if present, else gdistill's local copy.

  The local copy is prepared from ``local_dir`` into ``data_dir`` on first
  use; TFDS's own builder is downloaded only if the IDX files are missing and
  ``download`` is True.
  """
  if name == 'fashion_mnist':
    tfds_builder = _builder('fashion_mnist', data_dir)
    if _usable(tfds_builder):
      return tfds_builder
  local = fashion_mnist_local.make_builder(data_dir, local_dir)
  if local.is_prepared():
    return local
  missing = fashion_mnist_local.missing_files(local_dir)
  if not missing:
    return _prepare_local(data_dir, local_dir)
  if download and name == 'fashion_mnist':
    return _download(name, data_dir)
  other_fix = (_DOWNLOAD_FIX if name == 'fashion_mnist' else
               'point --config.data.data_dir at prepared data')
  raise DataError(
      f'data.name={name!r} is not prepared in data.data_dir='
      f'{_shown_dir(local)!r} and {missing[0]} is missing from {local_dir}:'
      f' run `{_APT_FIX}`, or {other_fix}.')


def _prepare_local(data_dir: str | None,
                   local_dir: str) -> tfds.core.DatasetBuilder:
  """Prepares gdistill_fashion_mnist from the IDX files into ``data_dir``."""
  try:
    return fashion_mnist_local.prepare(data_dir, local_dir)
  except OSError as e:
    raise DataError(
        f'data.data_dir={data_dir!r}: cannot prepare Fashion-MNIST from'
        f' {local_dir} there ({_first_line(e)}); expected a writable'
        ' directory.') from None


def _feature_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  """Returns the (image, label) feature keys, from supervised_keys if set."""
  keys = builder.info.supervised_keys
  if (isinstance(keys, tuple) and len(keys) == 2 and
      all(isinstance(k, str) for k in keys)):
    return keys
  return 'image', 'label'


def _image_and_label_features(name: str, builder: tfds.core.DatasetBuilder,
                              image_key: str,
                              label_key: str) -> tuple[Any, Any]:
  """Returns the Image and ClassLabel features, or raises DataError."""
  features = builder.info.features
  image = features[image_key] if image_key in features else None
  label = features[label_key] if label_key in features else None
  if not isinstance(image, tfds.features.Image) or not isinstance(
      label, tfds.features.ClassLabel):
    raise DataError(
        f'data.name={name!r} is not an image classification dataset; expected'
        f' an Image feature {image_key!r} and a ClassLabel {label_key!r}.')
  shape = image.shape
  if len(shape) != 3 or any(d is None for d in shape):
    raise DataError(f'data.name={name!r} has images of variable shape {shape};'
                    ' expected a fixed (H, W, C), e.g. imagenet_resized/64x64.')
  return image, label


def _make_source(name: str, split: str,
                 builder: tfds.core.DatasetBuilder) -> ImageSource:
  """Builds the ImageSource of ``split`` from a prepared builder."""
  image_key, label_key = _feature_keys(builder)
  image, label = _image_and_label_features(name, builder, image_key, label_key)
  try:
    data_source = builder.as_data_source(split=split)
  except (KeyError, ValueError) as e:
    raise DataError(f'split={split!r} is not available for data.name={name!r}'
                    f' ({_first_line(e)}); expected a split of'
                    f' {sorted(builder.info.splits)} or a TFDS slice such as'
                    " 'train[:90%]'.") from None
  image_shape = tuple(int(d) for d in image.shape)
  num_examples = len(data_source)
  decoded_bytes = num_examples * int(np.prod(image_shape))
  in_memory = decoded_bytes < IN_MEMORY_MAX_BYTES
  cache_path, cache_key = None, ''
  if in_memory:
    try:
      files = builder.info.splits[split].file_instructions
    except (KeyError, ValueError, AttributeError):
      files = None  # not a split TFDS can list files for: decoded every time
    if files:
      cache_path, cache_key = decoded_cache.path_and_key(
          builder.data_dir, split, image_shape, image_key, label_key, files)
  return ImageSource(
      name=name,
      split=split,
      num_examples=num_examples,
      image_shape=image_shape,
      num_classes=int(label.num_classes),
      class_names=list(label.names),
      data_source=data_source,
      in_memory=in_memory,
      image_key=image_key,
      label_key=label_key,
      cache_path=cache_path,
      cache_key=cache_key,
  )
