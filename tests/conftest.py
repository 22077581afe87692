"""Shared test set-up: 8 fake CPU devices and a prepared Fashion-MNIST data dir.

The device count must be in XLA_FLAGS before JAX initialises its backends, so
it is set here, at import time of the conftest (pytest imports it before any
test module). Tests that do not need 8 devices build their meshes over
``jax.devices()[:1]`` explicitly.
"""

import atexit
import os
import shutil
import tempfile

NUM_FAKE_DEVICES = 8
_FLAG = f'--xla_force_host_platform_device_count={NUM_FAKE_DEVICES}'
_flags = os.environ.get('XLA_FLAGS', '')
if 'xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = f'{_flags} {_FLAG}'.strip()

# One persistent compilation cache for the session, this process and the gdistill
# processes the tests start (they inherit the environment): the suite compiles the same
# smoke steps in many tests and processes, and a cache hit costs milliseconds.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix='gdistill-test-jax-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from gd_testlib import GaussianData  # pylint: disable=g-import-not-at-top,wrong-import-position


# Files that run whole smoke pipelines go first: pytest-xdist (pytest.ini) hands out
# whole files in collection order, and the longest one started last would finish alone.
LONGEST_FIRST = ('test_pipeline.py', 'test_loop.py', 'test_gcs.py', 'test_demo.py',
                 'test_data.py')


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
  items.sort(key=rank)  # stable: tests keep their order within a file


@pytest.fixture(scope='session')
def devices8():
  """Eight CPU devices (skips if JAX was initialised before the flag was set)."""
  devices = jax.devices()
  if len(devices) < NUM_FAKE_DEVICES:
    pytest.skip(f'needs {NUM_FAKE_DEVICES} devices, JAX has {len(devices)} '
                '(was it initialised before tests/conftest.py set XLA_FLAGS?)')
  return devices[:NUM_FAKE_DEVICES]


@pytest.fixture(scope='session')
def fashion_data_dir(tmp_path_factory):
  """A TFDS data_dir holding Fashion-MNIST ready for ``open_source``.

  Reuses TFDS's default directory when gdistill's local copy is already
  prepared there (the common case, and instant); otherwise prepares it once per
  session from Debian's IDX files into a temporary directory that every
  pytest-xdist worker of the session shares (``prepare`` locks it; the decoded
  splits cached there serve every worker's commands). Returns '' for
  the default directory, so it can be passed as ``--config.data.data_dir=``.
  """
  from gdistill.data import fashion_mnist_local  # pylint: disable=g-import-not-at-top
  source = fashion_mnist_local.DEFAULT_SOURCE_DIR
  try:
    if fashion_mnist_local.make_builder(None, source).is_prepared():
      return ''
  except Exception:  # pylint: disable=broad-except
    pass  # an unreadable default dir: prepare our own below
  if fashion_mnist_local.missing_files(source):
    pytest.skip(f'Fashion-MNIST IDX files absent from {source} '
                '(sudo apt-get install dataset-fashion-mnist)')
  if os.environ.get('PYTEST_XDIST_WORKER'):
    data_dir = str(tmp_path_factory.getbasetemp().parent / 'tfds')
  else:
    data_dir = str(tmp_path_factory.mktemp('tfds'))
  fashion_mnist_local.prepare(data_dir, source)
  return data_dir


TINY_SHAPE = (8, 8, 1)  # small images keep the compiled U-Net passes cheap
NUM_CLASSES = 10


@pytest.fixture(scope='session')
def tiny_nets():
  """The tiny U-Net without and with the w input, really initialised (once per
  session: the init is the expensive compile), and jitted apply functions.

  Keys: base, with_w (modules); fresh, fresh_w (their initial params);
  apply(p, z, logsnr, label), apply_w(p, z, logsnr, label, w).
  """
  from gdistill.models import unet  # pylint: disable=g-import-not-at-top
  from gdistill.networks import init_params  # pylint: disable=g-import-not-at-top
  base = unet.build_unet(size='tiny', num_classes=NUM_CLASSES, out_ch=TINY_SHAPE[-1])
  with_w = unet.build_unet(size='tiny', num_classes=NUM_CLASSES, out_ch=TINY_SHAPE[-1],
                           use_w=True)
  # One real initialisation (the costly compile of the suite: threefry for every
  # parameter shape; an rbg key compiles several times faster). The network
  # without w has exactly the parameters of the one with w, less the w branch
  # (test_unet checks the structure).
  fresh_w = jax.jit(lambda r: init_params(with_w, r, TINY_SHAPE))(
      jax.random.key(0, impl='rbg'))
  fresh = {k: v for k, v in fresh_w.items() if not k.startswith('w_dense')}
  return dict(
      base=base, with_w=with_w, fresh=fresh, fresh_w=fresh_w, shape=TINY_SHAPE,
      num_classes=NUM_CLASSES,
      apply=jax.jit(lambda p, z, l, c: base.apply({'params': p}, z, l, c)),
      apply_w=jax.jit(lambda p, z, l, c, w: with_w.apply({'params': p}, z, l, c, w=w)))


@pytest.fixture
def gaussian():
  return GaussianData()
