"""Tests of gdistill.data: offline Fashion-MNIST, TFDS sources, the Grain pipeline."""

import gzip
import importlib.util
import os
import shutil
import tempfile
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
  example = source.examples()[99]  # what the training pipeline reads
  np.testing.assert_array_equal(example['image'], images[99])
  assert example['label'] == labels[99] and example['label'].dtype == np.int32


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


def test_unprepared_dataset_leaves_no_tfds_scratch_dir(tmp_path, monkeypatch,
                                                      no_download):
  # TFDS makes mkdtemp('tfds') for an unprepared dataset's metadata and leaves it.
  scratch = tmp_path / 'tmp'
  scratch.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
  for name in ('fashion_mnist', 'cifar10'):
    with pytest.raises(data.DataError):
      data.open_source(name=name, split='train', data_dir=str(tmp_path / 'tfds'),
                       local_fashion_mnist_dir=str(tmp_path / 'absent'))
  assert not list(scratch.iterdir())


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


# --- the Grain training pipeline -------------------------------------------------


def _fake_source(num_examples=40, shape=(4, 4, 1)):
  """A source whose label is the example's index (so batches show their order)."""
  rng = np.random.default_rng(0)
  examples = [{'image': rng.integers(0, 256, shape, dtype=np.uint8), 'label': i}
              for i in range(num_examples)]
  examples[0]['image'][...] = 0
  examples[1]['image'][...] = 255
  return data.ImageSource(
      name='fake', split='train', num_examples=num_examples,
      image_shape=shape, num_classes=num_examples,
      class_names=[str(i) for i in range(num_examples)], data_source=examples,
      in_memory=True), examples


def _order(source, *, seed, batch_size, steps, rows=None):
  """Example indices of global batches 0 .. steps - 1, in order (rows: a process's)."""
  batches = pipeline.local_batches(source, seed=seed, batch_size=batch_size,
                                   rows=rows or slice(0, batch_size))
  return np.concatenate([batches[s]['label'] for s in range(steps)])


def _sharding(devices):
  mesh = Mesh(np.array(devices), ('data',))
  return NamedSharding(mesh, PartitionSpec('data'))


def _host(batches):
  return [{k: np.asarray(v) for k, v in b.items()} for b in batches]


def test_batches_are_a_pure_function_of_seed_and_step():
  source, _ = _fake_source()
  first = _order(source, seed=3, batch_size=8, steps=12)
  np.testing.assert_array_equal(first, _order(source, seed=3, batch_size=8, steps=12))
  assert not np.array_equal(first, _order(source, seed=4, batch_size=8, steps=12))


def test_each_epoch_visits_every_example_once_in_its_own_order():
  source, _ = _fake_source(num_examples=20)
  # batch 7 does not divide 20: batch 2 straddles epochs 0 and 1.
  order = _order(source, seed=5, batch_size=7, steps=9)
  epochs = order[:60].reshape(3, 20)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(20))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[0], np.arange(20))


def test_shuffle_seeds_are_mixed():
  # Grain seeds epoch e with seed + e: without mixing, seed 1's first epoch would
  # be seed 0's second.
  source, _ = _fake_source()
  assert pipeline.shuffle_seed(0) + 1 != pipeline.shuffle_seed(1)
  second_of_0 = _order(source, seed=0, batch_size=8, steps=10)[40:]
  assert not np.array_equal(second_of_0, _order(source, seed=1, batch_size=8, steps=5))


def test_a_process_reads_only_its_block_of_each_global_batch():
  source, _ = _fake_source()
  whole = _order(source, seed=2, batch_size=8, steps=6).reshape(6, 8)
  for p in range(2):  # process p of 2 holds rows 4p .. 4p + 3
    part = _order(source, seed=2, batch_size=8, steps=6, rows=slice(4 * p, 4 * p + 4))
    np.testing.assert_array_equal(part.reshape(6, 4), whole[:, 4 * p:4 * p + 4])
  with pytest.raises(ValueError, match='blocks'):
    pipeline.local_batches(source, seed=0, batch_size=8, rows=slice(2, 5))


@pytest.mark.parametrize('num_devices', [1, None])
def test_train_batches_gives_scaled_sharded_arrays(num_devices):
  devices = jax.devices()[:num_devices]
  source, examples = _fake_source()
  batch_size = 8 * len(devices)
  sharding = _sharding(devices)
  batches = data.train_batches(source, seed=1, batch_size=batch_size, sharding=sharding,
                               start=2, stop=3)
  batch = next(batches)
  image, label = batch['image'], batch['label']
  assert image.shape == (batch_size, 4, 4, 1) and image.dtype == np.float32
  assert label.shape == (batch_size,) and label.dtype == np.int32
  assert image.sharding == sharding
  assert label.sharding.spec == PartitionSpec('data')
  indices = _order(source, seed=1, batch_size=batch_size, steps=3)[2 * batch_size:]
  np.testing.assert_array_equal(np.asarray(label), indices)
  expected = np.stack([examples[i]['image'] for i in indices])
  np.testing.assert_allclose(np.asarray(image), expected / 127.5 - 1, atol=1e-6)
  assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
  with pytest.raises(StopIteration):
    next(batches)


def test_resumed_mid_epoch_gives_the_batches_of_an_uninterrupted_run():
  """5 batches per epoch: resuming at step 7 (epoch 1, its third batch) by position,
  as the loop does from its checkpoint's step, or from the Grain iterator's state,
  gives exactly the batches the uninterrupted run saw."""
  source, _ = _fake_source()
  sharding = _sharding(jax.devices())
  batch_size = 8 * len(jax.devices())
  run = lambda start: _host(data.train_batches(
      source, seed=1, batch_size=batch_size, sharding=sharding, start=start, stop=12))
  uninterrupted, resumed = run(0), run(7)
  assert len(resumed) == 5
  for want, got in zip(uninterrupted[7:], resumed):
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])

  dataset = pipeline.local_batches(source, seed=1, batch_size=8,
                                   rows=slice(0, 8)).to_iter_dataset()
  iterator = iter(dataset)
  seen = [next(iterator) for _ in range(7)]
  state = iterator.get_state()
  assert state == {'next_index': 7}  # the Grain iterator's whole state: the step
  after = [next(iterator) for _ in range(5)]
  restored = iter(dataset)
  restored.set_state(state)
  for want, got in zip(after, [next(restored) for _ in range(5)]):
    np.testing.assert_array_equal(got['label'], want['label'])
    np.testing.assert_array_equal(got['image'], want['image'])
  del seen


@pytest.mark.slow  # starts worker processes: seconds each, more on a busy machine
def test_worker_processes_give_the_same_batches():
  source, _ = _fake_source()
  sharding = _sharding(jax.devices())
  batch_size = 8 * len(jax.devices())
  run = lambda workers: _host(data.train_batches(
      source, seed=1, batch_size=batch_size, sharding=sharding, start=3, stop=11,
      workers=workers))
  in_process = run(0)
  for got, want in zip(run(2), in_process):
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_auto_workers_follow_the_cores(monkeypatch):
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(2)))
  assert data.num_workers(data.AUTO_WORKERS) == 0
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(16)))
  assert data.num_workers(data.AUTO_WORKERS) == 4
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(240)))
  assert data.num_workers(data.AUTO_WORKERS) == 8
  assert data.num_workers(3) == 3


def test_to_model_input_maps_extremes_to_minus_one_and_one():
  out = pipeline.to_model_input({
      'image': np.array([[[[0]], [[255]]]], np.uint8),
      'label': np.array([3], np.int64)})
  np.testing.assert_array_equal(out['image'].ravel(), [-1.0, 1.0])
  assert out['image'].dtype == np.float32 and out['label'].dtype == np.int32


def test_train_batches_requires_batch_divisible_by_process_count(monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 3)
  source, _ = _fake_source()
  with pytest.raises(ValueError, match='batch_size'):
    data.train_batches(source, seed=0, batch_size=8, sharding=_sharding(jax.devices()[:1]),
                       start=0, stop=1)
