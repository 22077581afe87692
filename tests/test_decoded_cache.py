"""The decoded-split cache: a later process reads exactly what decoding gives, and a
stale, broken or unwritable cache only costs the decode."""

import os
import shutil

import numpy as np
import pytest

from gdistill.data import decoded_cache
from gdistill.data import sources

SPLIT = 'test[:300]'


@pytest.fixture
def data_dir(fashion_data_dir, tmp_path, monkeypatch):
  """A private copy of the prepared local Fashion-MNIST (its cache files are ours)."""
  monkeypatch.delenv(decoded_cache.ENV, raising=False)
  src = sources.open_source('fashion_mnist', split='test', data_dir=fashion_data_dir or None)
  version_dir = os.path.dirname(src.cache_path)
  dest = tmp_path / 'tfds'
  shutil.copytree(os.path.dirname(version_dir),
                  dest / os.path.basename(os.path.dirname(version_dir)),
                  ignore=shutil.ignore_patterns('gdistill-decoded-*'))
  return str(dest)


def _load(data_dir):
  s = sources.open_source('fashion_mnist', split=SPLIT, data_dir=data_dir)
  s.load()
  return s


def _decoded_without_cache(data_dir, monkeypatch):
  with monkeypatch.context() as m:
    m.setenv(decoded_cache.ENV, '0')
    s = _load(data_dir)
    assert s.cache_path is None
    return s._images, s._labels  # pylint: disable=protected-access


def _no_decoding(monkeypatch):
  def fail(self):
    raise AssertionError('decoded instead of reading the cache')
  monkeypatch.setattr(sources.ImageSource, '_decoded', fail)


def test_second_process_reads_exactly_what_decoding_gave(data_dir, monkeypatch):
  want = _decoded_without_cache(data_dir, monkeypatch)
  first = _load(data_dir)
  assert os.path.isfile(first.cache_path) and first.cache_path.startswith(data_dir)
  assert not [f for f in os.listdir(os.path.dirname(first.cache_path)) if '.tmp' in f]
  _no_decoding(monkeypatch)
  again = _load(data_dir)
  for have, ref in zip((again._images, again._labels), want):  # pylint: disable=protected-access
    assert have.dtype == ref.dtype and np.array_equal(have, ref)
  # The pipeline's reads go through the same arrays.
  np.testing.assert_array_equal(again.get(np.array([0, 299]))['image'], want[0][[0, 299]])


def test_data_prepared_again_is_decoded_again(data_dir, monkeypatch):
  s = _load(data_dir)
  record = [f for f in os.listdir(os.path.dirname(s.cache_path)) if '-test.array_record' in f]
  path = os.path.join(os.path.dirname(s.cache_path), record[0])
  st = os.stat(path)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  calls = []
  real = sources.ImageSource._decoded  # pylint: disable=protected-access
  monkeypatch.setattr(sources.ImageSource, '_decoded',
                      lambda self: calls.append(1) or real(self))
  again = _load(data_dir)
  assert calls and again.cache_key != s.cache_key
  _no_decoding(monkeypatch)
  assert np.array_equal(_load(data_dir)._images, again._images)  # pylint: disable=protected-access


@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'other_shape'])
def test_broken_cache_file_is_decoded_and_replaced(data_dir, monkeypatch, damage):
  want = _decoded_without_cache(data_dir, monkeypatch)
  path = _load(data_dir).cache_path
  if damage == 'truncate':
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  elif damage == 'garbage':
    with open(path, 'wb') as f:
      f.write(b'not an npz')
  else:
    key = str(np.load(path)['key'])
    with open(path, 'wb') as f:
      np.savez(f, images=np.zeros((3, 28, 28, 1), np.uint8), labels=np.zeros(3, np.int32),
               key=np.array(key))
  s = _load(data_dir)
  assert np.array_equal(s._images, want[0]) and np.array_equal(s._labels, want[1])  # pylint: disable=protected-access
  _no_decoding(monkeypatch)
  assert np.array_equal(_load(data_dir)._images, want[0])  # pylint: disable=protected-access


def test_a_directory_that_cannot_take_the_file_costs_only_the_decode(data_dir, monkeypatch):
  want = _decoded_without_cache(data_dir, monkeypatch)

  def full(*args, **kwargs):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(np, 'savez', full)
  s = _load(data_dir)
  assert np.array_equal(s._images, want[0])  # pylint: disable=protected-access
  assert not [f for f in os.listdir(os.path.dirname(s.cache_path)) if 'gdistill-decoded' in f]


def test_turned_off_writes_nothing(data_dir, monkeypatch):
  monkeypatch.setenv(decoded_cache.ENV, '0')
  _load(data_dir)
  version_dirs = [d for d, _, files in os.walk(data_dir)
                  if any('gdistill-decoded' in f for f in files)]
  assert not version_dirs
