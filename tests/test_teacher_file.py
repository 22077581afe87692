"""gdistill.teacher_file: single-file sampling parameters, their checks, and export from
a phase's checkpoints (with a smoke-sized U-Net on 8x8 images; no compilation)."""

import functools
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from gd_testlib import random_like
from gdistill import checkpoint, networks, teacher_file
from gdistill.checkpoint import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (8, 8, 1)
K = 10


def _config(**model):
  spec = importlib.util.spec_from_file_location('smoke', os.path.join(REPO, 'configs', 'smoke.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.update(**model)
  return c


def _abstract(config, use_w=False):
  return teacher_file.abstract_params_for(config, use_w=use_w, num_classes=K, image_shape=SHAPE)


@pytest.fixture(scope='module')
def setup():
  config = _config()
  abstract = _abstract(config)
  return config, abstract, random_like(abstract, seed=0)


def _save(path, cfg, params, **extra):
  info = teacher_file.network_info(cfg, use_w=False, num_classes=K, image_shape=SHAPE)
  return teacher_file.save_params(str(path), params, dict(info, **extra))


def _expect(config):
  return teacher_file.expected(config, use_w=False, num_classes=K, image_shape=SHAPE)


def _error(fn) -> str:
  with pytest.raises(CheckpointError) as e:
    fn()
  msg = str(e.value)
  assert '\n' not in msg, msg
  assert isinstance(e.value, ValueError)
  return msg


def test_round_trip_keeps_every_array_and_the_info(setup, tmp_path):
  config, abstract, params = setup
  path = tmp_path / 'weights' / 'teacher.msgpack'
  written = _save(path, config, params, steps=6, images_seen=96, fid={'w0': 3.5},
                  config=config.to_dict())
  assert sorted(os.listdir(path.parent)) == ['teacher.json', 'teacher.msgpack']  # no tmp files
  side = json.loads((tmp_path / 'weights' / 'teacher.json').read_text())
  assert side == written
  assert side['weights']['bytes'] == os.path.getsize(path)
  assert side['weights']['num_params'] == networks.param_count(params)
  assert side['model']['ch_mult'] == [1, 2] and side['image_shape'] == list(SHAPE)
  assert side['config']['model']['ch'] == 16 and side['fid'] == {'w0': 3.5}

  loaded, info = teacher_file.load_params(str(path), expect=_expect(config),
                                          abstract_params=abstract)
  assert info == side
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  raw, _ = teacher_file.load_params(str(path), expect=None, abstract_params=None)
  assert networks.param_count(raw) == networks.param_count(params)


def test_float16_storage_halves_the_file_and_reads_back_as_float32(setup, tmp_path):
  config, abstract, params = setup
  full = _save(tmp_path / 'a.msgpack', config, params)
  info = teacher_file.network_info(config, use_w=False, num_classes=K, image_shape=SHAPE)
  half = teacher_file.save_params(str(tmp_path / 'b.msgpack'), params, info, dtype='float16')
  assert half['weights']['dtype'] == 'float16'
  assert half['weights']['bytes'] < 0.55 * full['weights']['bytes']
  loaded, _ = teacher_file.load_params(str(tmp_path / 'b.msgpack'), expect=_expect(config),
                                       abstract_params=abstract)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(np.float16))
  with pytest.raises(ValueError, match="dtype='int8'"):
    teacher_file.save_params(str(tmp_path / 'c.msgpack'), params, info, dtype='int8')


def test_loaded_arrays_take_the_abstract_shardings(setup, tmp_path, devices8):
  config, abstract, params = setup
  mesh = jax.sharding.Mesh(np.array(devices8[:2]), ('data',))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                         abstract)
  path = tmp_path / 't.msgpack'
  _save(path, config, params)
  loaded, _ = teacher_file.load_params(str(path), expect=_expect(config),
                                       abstract_params=sharded)
  assert all(x.sharding == repl for x in jax.tree.leaves(loaded))


def test_truncated_or_corrupted_file_is_a_one_line_error_naming_it(setup, tmp_path):
  config, abstract, params = setup
  path = tmp_path / 't.msgpack'
  _save(path, config, params)
  size = os.path.getsize(path)
  data = path.read_bytes()
  os.truncate(path, size // 2)
  msg = _error(lambda: teacher_file.load_params(str(path), expect=_expect(config),
                                                abstract_params=abstract))
  assert str(path) in msg
  assert f'truncated or corrupted: {size // 2} bytes, expected {size}' in msg

  flipped = bytearray(data)
  flipped[size // 2] ^= 0xFF
  path.write_bytes(bytes(flipped))
  msg = _error(lambda: teacher_file.load_params(str(path), expect=_expect(config),
                                                abstract_params=abstract))
  assert str(path) in msg and 'truncated or corrupted: sha256' in msg


def test_another_architecture_names_the_key_and_both_values(setup, tmp_path):
  config, _, params = setup
  path = tmp_path / 't.msgpack'
  _save(path, config, params)
  other = _config(ch=8)
  msg = _error(lambda: teacher_file.load_params(str(path), expect=_expect(other),
                                                abstract_params=_abstract(other)))
  assert str(path) in msg and 'model.ch=16 (expected 8)' in msg
  msg = _error(lambda: teacher_file.load_params(
      str(path), expect=teacher_file.expected(config, use_w=True, num_classes=K,
                                              image_shape=SHAPE),
      abstract_params=_abstract(config, use_w=True)))
  assert 'use_w=false (expected true)' in msg
  # Without the sidecar check, the tree itself does not fit: named by parameter path.
  msg = _error(lambda: teacher_file.load_params(str(path), expect=None,
                                                abstract_params=_abstract(other)))
  assert str(path) in msg and 'do not fit the network' in msg and 'expected (' in msg
  msg = _error(lambda: teacher_file.load_params(str(path), expect=None,
                                                abstract_params=_abstract(config, use_w=True)))
  assert 'missing' in msg and 'w_dense' in msg


def test_missing_and_unreadable_files(setup, tmp_path):
  config, abstract, params = setup
  path = tmp_path / 't.msgpack'
  load = lambda: teacher_file.load_params(str(path), expect=_expect(config),
                                          abstract_params=abstract)
  msg = _error(load)
  assert str(path) in msg and 'no such file' in msg
  _save(path, config, params)
  side = tmp_path / 't.json'
  text = side.read_text()
  side.write_text(text[:len(text) // 2])
  msg = _error(load)
  assert str(side) in msg and 'unreadable' in msg
  side.unlink()
  msg = _error(load)
  assert str(side) in msg and 'no such file' in msg

  # A file that matches its sidecar but is no msgpack tree.
  garbage = b'\xc1' * 64
  path.write_bytes(garbage)
  info = json.loads(text)
  import hashlib  # pylint: disable=g-import-not-at-top
  info['weights'].update(bytes=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
  side.write_text(json.dumps(info))
  msg = _error(load)
  assert str(path) in msg and 'msgpack' in msg

  with pytest.raises(ValueError, match='set by save_params'):
    teacher_file.save_params(str(path), params, {'weights': 1})


def _write_phase(directory, config, abstract, steps):
  """A teacher phase directory whose checkpoints hold raw and EMA params per step."""
  mgr = checkpoint.manager(directory)
  meta = dict(teacher_file.network_info(config, use_w=False, num_classes=K, image_shape=SHAPE),
              phase='teacher', has_ema=True, student_steps=None)
  emas = {}
  for step in steps:
    emas[step] = random_like(abstract, seed=100 + step)
    state = {'step': np.int32(step), 'params': random_like(abstract, seed=step),
             'ema_params': emas[step]}
    checkpoint.save(mgr, step, state, meta)
  mgr.wait_until_finished()
  mgr.close()
  return emas


def test_export_phase_and_any_saved_step(setup, tmp_path):
  config, abstract, _ = setup
  directory = str(tmp_path / 'checkpoints' / 'teacher')
  emas = _write_phase(directory, config, abstract, (2, 4))
  assert teacher_file.phase_steps(directory) == [2, 4]
  times = teacher_file.step_times(directory, [2, 4])
  assert times[2] is not None and times[2] <= times[4]

  out = str(tmp_path / 'w' / 'teacher.msgpack')
  info = teacher_file.export_phase(directory, out, config=config, extra_info={'fid': 2.5})
  assert info['step'] == 4 and info['images_seen'] == 4 * config.teacher.batch_size
  assert info['weights_kind'] == 'ema' and info['fid'] == 2.5 and info['phase'] == 'teacher'
  loaded, _ = teacher_file.load_params(out, expect=_expect(config), abstract_params=abstract)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(emas[4])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  params, meta = teacher_file.load_step_params(directory, abstract, step=2,
                                               expect=_expect(config))
  assert meta['has_ema']
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(emas[2])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  msg = _error(lambda: teacher_file.load_step_params(directory, abstract, step=3))
  assert directory in msg and 'no step 3' in msg and '[2, 4]' in msg
  msg = _error(lambda: teacher_file.load_step_params(directory, abstract, step=2,
                                                     expect=_expect(_config(ch=8))))
  assert 'model=' in msg
  msg = _error(lambda: teacher_file.export_phase(str(tmp_path / 'nothing'), out, config=config))
  assert 'no checkpoint found' in msg

  # The command line, in-process: the workdir's config.json drives it.
  workdir = tmp_path
  (workdir / 'config.json').write_text(json.dumps(config.to_dict()))
  cli_out = str(tmp_path / 'cli' / 'x.msgpack')
  assert teacher_file.main(['export', f'--workdir={workdir}', '--phase=teacher',
                            f'--output={cli_out}', '--step=2', '--fid={"w1": 4.0}',
                            '--info', 'note=first try']) == 0
  cli_info = teacher_file.read_info(cli_out)
  assert cli_info['step'] == 2 and cli_info['fid'] == {'w1': 4.0}
  assert cli_info['note'] == 'first try'


def _embedded_default():
  spec = importlib.util.spec_from_file_location('fashion_mnist',
                                                os.path.join(REPO, 'configs', 'fashion_mnist.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_the_shipped_teacher_loads_and_samples(tmp_path):
  """The embedded default's teacher (gdistill/weights/) loads through the model store, as
  the driver loads it, and its guided DDIM draws images of every class."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from gdistill import compiled_samplers, sharding  # pylint: disable=g-import-not-at-top
  from gdistill.model_store import ModelStore  # pylint: disable=g-import-not-at-top
  config = _embedded_default()
  mesh = sharding.make_mesh({'data': 1}, jax.devices()[:1])
  store = ModelStore(str(tmp_path), config, mesh=mesh, image_shape=(28, 28, 1), num_classes=10)
  assert os.path.isfile(store.directory('teacher')), store.directory('teacher')
  info = store.meta('teacher')
  assert info['phase'] == 'teacher' and info['step'] == store.step('teacher') > 0
  assert info['weights']['bytes'] <= 10 * 2**20 and info['weights']['dtype'] == 'float32'
  assert config.teacher.num_steps == info['step']  # the config says what it was trained for
  model = store.load('teacher')
  assert model.mode == 'guided'
  label = jnp.arange(10, dtype=jnp.int32)
  z_1 = jax.random.normal(jax.random.PRNGKey(0), (10, 28, 28, 1))
  fn = compiled_samplers.make_sample_fn(model.net, mode='guided', sampler='ddim')
  x = np.asarray(fn(model.params, label, jnp.float32(1.0), z_1, jnp.int32(4),
                    jax.random.PRNGKey(1)))
  assert x.shape == (10, 28, 28, 1) and np.all(np.abs(x) <= 1.0)
  assert x.std() > 0.2 and np.abs(x[0] - x[1]).mean() > 0.05  # images, and not all alike
