"""Tests of gdistill.data: offline Fashion-MNIST, TFDS sources, batching."""

import gzip
import importlib.util
import os
import shutil
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gdistill import data
from gdistill.data import fashion_mnist_local
from gdistill.data import pipeline

FASHION_DIR = fashion_mnist_local.DEFAULT_SOURCE_DIR
needs_fashion_files = pytest.mark.skipif(
    bool(fashion_mnist_local.missing_files(FASHION_DIR)),
    reason=f'Fashion-MNIST IDX files absent from {FASHION_DIR}'
    ' (sudo apt-get install dataset-fashion-mnist)')


@pytest.fixture
def no_download(monkeypatch):
  """Fails the test if anything reaches TFDS's download machinery."""

  def fail(*args, **kwargs):
    raise AssertionError('TFDS download machinery was called.')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', fail)
  for method in ('download', 'download_and_extract', 'extract'):
    monkeypatch.setattr(tfds.download.DownloadManager, method, fail)
  monkeypatch.setattr(tfds.core.utils.gcs_utils, 'exists', fail)


@pytest.fixture(scope='module')
def raw_fashion():
  """Raw IDX arrays of both splits, straight from the .gz files."""
  if fashion_mnist_local.missing_files(FASHION_DIR):
    pytest.skip(f'Fashion-MNIST IDX files absent from {FASHION_DIR}')
  return {split: fashion_mnist_local.read_split(FASHION_DIR, split)
          for split in ('train', 'test')}


@pytest.fixture(scope='module')
def prepared_dir(tmp_path_factory, raw_fashion):
  """A TFDS data_dir with gdistill_fashion_mnist prepared once per module."""
  del raw_fashion  # Only for the skip.
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  fashion_mnist_local.prepare(data_dir, FASHION_DIR)
  return data_dir


# --- Local Fashion-MNIST builder ---------------------------------------------


def test_local_builder_splits_and_content(prepared_dir, raw_fashion):
  builder = fashion_mnist_local.make_builder(prepared_dir)
  assert builder.is_prepared()
  assert builder.info.splits['train'].num_examples == 60000
  assert builder.info.splits['test'].num_examples == 10000
  assert builder.info.features['label'].names == list(
      fashion_mnist_local.CLASS_NAMES)
  for split, picks in (('train', [0, 1, 31337, 59999]), ('test', [0, 9999])):
    source = builder.as_data_source(split=split)
    images, labels = raw_fashion[split]
    for i in picks:
      example = source[i]
      assert example['image'].shape == (28, 28, 1)
      assert example['image'].dtype == np.uint8
      np.testing.assert_array_equal(example['image'], images[i])
      assert example['label'] == labels[i]


def test_local_builder_reuses_prepared_data(prepared_dir, no_download):
  builder = fashion_mnist_local.prepare(prepared_dir, FASHION_DIR)
  assert builder.is_prepared()


@needs_fashion_files
def test_interrupted_preparation_leaves_nothing_usable(tmp_path):
  source_dir = tmp_path / 'idx'
  source_dir.mkdir()
  for name in fashion_mnist_local.required_files():
    shutil.copy(os.path.join(FASHION_DIR, name), source_dir / name)
  with gzip.open(source_dir / 'train-images-idx3-ubyte.gz', 'wb') as f:
    f.write(b'\x00\x00\x08\x03' + b'\x00' * 64)  # Truncated train images.
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(ValueError):
    fashion_mnist_local.prepare(data_dir, str(source_dir))
  assert not fashion_mnist_local.make_builder(data_dir).is_prepared()
  version_dir = tmp_path / 'tfds' / fashion_mnist_local.NAME / '1.0.0'
  assert not version_dir.exists()
  with pytest.raises(data.DataError, match='apt-get'):
    data.open_source('fashion_mnist', split='train', data_dir=data_dir,
                     local_fashion_mnist_dir=str(tmp_path / 'absent'))


# --- open_source ---------------------------------------------------------------


def test_open_source_fashion_mnist_from_local_files(prepared_dir, raw_fashion,
                                                    no_download):
  source = data.open_source('fashion_mnist', split='test',
                            data_dir=prepared_dir)
  assert (source.name, source.split) == ('fashion_mnist', 'test')
  assert source.num_examples == 10000
  assert source.image_shape == (28, 28, 1)
  assert source.num_classes == 10
  assert source.class_names[0] == 'T-shirt/top'
  assert source.class_names[9] == 'Ankle boot'
  assert source.in_memory
  picks = np.array([9999, 0, 17, 17])
  batch = source.get(picks)
  assert batch['image'].shape == (4, 28, 28, 1)
  assert batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32
  images, labels = raw_fashion['test']
  np.testing.assert_array_equal(batch['image'], images[picks])
  np.testing.assert_array_equal(batch['label'], labels[picks])
  with pytest.raises(IndexError):
    source.get(np.array([10000]))


def test_open_source_reads_by_index_when_not_in_memory(prepared_dir,
                                                       raw_fashion):
  source = data.open_source('fashion_mnist', split='train[:100]',
                            data_dir=prepared_dir)
  assert source.num_examples == 100
  source.in_memory = False  # As for datasets above the in-memory limit.
  batch = source.get(np.array([99, 3]))
  images, labels = raw_fashion['train']
  np.testing.assert_array_equal(batch['image'], images[[99, 3]])
  np.testing.assert_array_equal(batch['label'], labels[[99, 3]])


def _assert_fast_data_error(match, **kwargs):
  start = time.monotonic()
  with pytest.raises(data.DataError, match=match) as info:
    data.open_source(**kwargs)
  assert time.monotonic() - start < 10
  assert '\n' not in str(info.value)
  return str(info.value)


@pytest.mark.parametrize('name', ['no_such_dataset', 'cifar1O', ''])
def test_unknown_dataset_is_data_error(name, tmp_path, no_download):
  message = _assert_fast_data_error(
      'data.name', name=name, split='train', data_dir=str(tmp_path))
  assert 'cifar10' in message


def test_unprepared_dataset_is_data_error_without_download(tmp_path,
                                                           no_download):
  message = _assert_fast_data_error(
      'not prepared', name='cifar10', split='train', data_dir=str(tmp_path))
  assert 'data.download=True' in message
  assert 'data.data_dir' in message
  assert not list(tmp_path.iterdir())  # Nothing written.


def test_fashion_mnist_without_files_or_data_says_apt_get(tmp_path,
                                                          no_download):
  message = _assert_fast_data_error(
      'apt-get install dataset-fashion-mnist', name='fashion_mnist',
      split='train', data_dir=str(tmp_path / 'tfds'),
      local_fashion_mnist_dir=str(tmp_path / 'absent'))
  assert 'data.data_dir' in message


@pytest.mark.skipif(
    importlib.util.find_spec('tensorflow') is not None,
    reason='TensorFlow is installed: download=True would really download.')
def test_download_without_tensorflow_fails_fast(tmp_path, no_download):
  _assert_fast_data_error('TensorFlow', name='cifar10', split='train',
                          data_dir=str(tmp_path), download=True)


def test_generic_tfds_path_with_mock_data(monkeypatch):
  # tfds.testing.mock_data fakes as_data_source (no TF needed) but not
  # is_prepared nor the prepared file format, which open_source checks
  # before opening anything: pretend cifar10 is prepared as array_record.
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared',
                      lambda self: True)
  monkeypatch.setattr(tfds.core.DatasetInfo, 'available_file_formats',
                      lambda self: {tfds.core.FileFormat.ARRAY_RECORD})
  with tfds.testing.mock_data(num_examples=12):
    source = data.open_source('cifar10', split='train')
    # tfds 4.9.10 bug: mock_data sets the fake records' __getitems__ to an
    # unbound functools.partial (MagicMock binds self only for real dunder
    # methods), so batched reads fail; route them through __getitem__.
    records = source.data_source.data_source
    records.__getitems__ = lambda keys: [records[k] for k in keys]
    assert source.num_examples == 12
    assert source.image_shape == (32, 32, 3)
    assert source.num_classes == 10
    batch = source.get(np.arange(12)[::-1])
  assert batch['image'].shape == (12, 32, 32, 3)
  assert batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32
  assert ((batch['label'] >= 0) & (batch['label'] < 10)).all()


# --- batch_indices ---------------------------------------------------------------


def _epoch(seed, num_examples, batch_size, epoch):
  steps_per_epoch = num_examples // batch_size
  return np.concatenate([
      data.batch_indices(seed=seed, step=s, batch_size=batch_size,
                         num_examples=num_examples)
      for s in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
  ])


def test_batch_indices_is_a_pure_function_of_seed_and_step():
  args = dict(seed=3, step=41, batch_size=16, num_examples=100)
  first = data.batch_indices(**args)
  data.batch_indices(seed=9, step=0, batch_size=16, num_examples=100)
  np.testing.assert_array_equal(first, data.batch_indices(**args))
  assert first.dtype == np.int64 and first.shape == (16,)


def test_batch_indices_cover_each_epoch_exactly_once():
  for epoch in range(3):
    order = _epoch(seed=0, num_examples=120, batch_size=8, epoch=epoch)
    np.testing.assert_array_equal(np.sort(order), np.arange(120))


def test_batch_indices_follow_the_documented_permutation():
  # batch_size 7 does not divide 20: step 2 straddles epochs 0 and 1.
  got = data.batch_indices(seed=5, step=2, batch_size=7, num_examples=20)
  perm0 = np.random.default_rng([5, 0]).permutation(20)
  perm1 = np.random.default_rng([5, 1]).permutation(20)
  np.testing.assert_array_equal(got, np.concatenate([perm0[14:], perm1[:1]]))


def test_batch_indices_differ_across_epochs_and_seeds():
  base = _epoch(seed=0, num_examples=120, batch_size=8, epoch=0)
  assert not np.array_equal(base, _epoch(0, 120, 8, epoch=1))
  assert not np.array_equal(base, _epoch(1, 120, 8, epoch=0))


def test_batch_indices_rejects_bad_arguments():
  with pytest.raises(ValueError, match='step'):
    data.batch_indices(seed=0, step=-1, batch_size=4, num_examples=10)
  with pytest.raises(ValueError, match='batch_size'):
    data.batch_indices(seed=0, step=0, batch_size=0, num_examples=10)


# --- global_batch ----------------------------------------------------------------


def _fake_source(num_examples=40, shape=(4, 4, 1)):
  rng = np.random.default_rng(0)
  examples = [{'image': rng.integers(0, 256, shape, dtype=np.uint8),
               'label': i % 10} for i in range(num_examples)]
  examples[0]['image'][...] = 0
  examples[1]['image'][...] = 255
  return data.ImageSource(
      name='fake', split='train', num_examples=num_examples,
      image_shape=shape, num_classes=10,
      class_names=[str(i) for i in range(10)], data_source=examples,
      in_memory=True), examples


def _sharding(devices):
  mesh = Mesh(np.array(devices), ('data',))
  return NamedSharding(mesh, PartitionSpec('data'))


@pytest.mark.parametrize('num_devices', [1, None])
def test_global_batch_gives_scaled_sharded_arrays(num_devices):
  devices = jax.devices()[:num_devices]
  source, examples = _fake_source()
  batch_size = 8 * len(devices)
  sharding = _sharding(devices)
  batch = data.global_batch(source, seed=1, step=2, batch_size=batch_size,
                            sharding=sharding)
  image, label = batch['image'], batch['label']
  assert image.shape == (batch_size, 4, 4, 1) and image.dtype == np.float32
  assert label.shape == (batch_size,) and label.dtype == np.int32
  assert image.sharding == sharding
  assert label.sharding.spec == PartitionSpec('data')
  indices = data.batch_indices(seed=1, step=2, batch_size=batch_size,
                               num_examples=source.num_examples)
  expected = np.stack([examples[i]['image'] for i in indices])
  np.testing.assert_allclose(np.asarray(image), expected / 127.5 - 1,
                             atol=1e-6)
  np.testing.assert_array_equal(np.asarray(label), indices % 10)
  assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_to_model_input_maps_extremes_to_minus_one_and_one():
  out = pipeline.to_model_input({
      'image': np.array([[[[0]], [[255]]]], np.uint8),
      'label': np.array([3], np.int64)})
  np.testing.assert_array_equal(out['image'].ravel(), [-1.0, 1.0])
  assert out['image'].dtype == np.float32 and out['label'].dtype == np.int32


def test_global_batch_requires_batch_divisible_by_process_count(monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 3)
  source, _ = _fake_source()
  with pytest.raises(ValueError, match='batch_size'):
    data.global_batch(source, seed=0, step=0, batch_size=8,
                      sharding=_sharding(jax.devices()[:1]))
