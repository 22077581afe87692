"""Latent runs (issue 28): the codec between the images and the diffusion.

No sampler clips x-hat in latent space; a run with ``codec.path`` trains, samples,
evaluates and translates through the autoencoder and gives images everywhere a user
sees them; a bad ``codec.path`` is one line naming the key. The shipped autoencoder's
round trip is in ``test_shipped_autoencoder_reconstructs_within_its_stated_error``.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smoke_workdir
from gd_testlib import random_like
from gdistill import codec, compiled_samplers, denoiser, grids, noise_paths, sharding
from gdistill.config_validation import ConfigError
from gdistill.model_store import ModelStore
from gdistill.run_setup import open_codec

ARCH = {'ch': 8, 'ch_mult': (1, 2), 'num_res_blocks': 1, 'latent_ch': 4, 'out_ch': 1}
SHAPE, LATENT = (28, 28, 1), (7, 7, 4)
SHIPPED = os.path.join(smoke_workdir.REPO, 'gdistill', 'weights',
                       'fashion_mnist_autoencoder.msgpack')


def _codec_file(tmp_path, seed=0):
  params = random_like(codec.abstract_params(ARCH, SHAPE), seed=seed)
  path = str(tmp_path / 'ae.msgpack')
  codec.save(path, codec.AutoencoderCodec(arch=ARCH, params=params, image_shape=SHAPE,
                                          scale=1.0, shift=0.0))
  return path


def _smoke_config(**codec_kw):
  sys.path.insert(0, os.path.join(smoke_workdir.REPO, 'configs'))
  import smoke  # pylint: disable=g-import-not-at-top
  c = smoke.get_config()
  c.model.ch_mult = (1,)  # 7x7 latents: no halving
  c.codec.update(codec_kw)
  return c


def _constant_x(value):
  """A Denoiser whose x-hat is ``value`` everywhere, whatever its input."""
  return denoiser.Denoiser(
      apply_fn=lambda params, z, t, cond, **kw: jnp.full_like(z, value), output='x',
      path=noise_paths.COSINE, null_cond=10)


@pytest.mark.parametrize('teacher_clip', ['guided', 'branches'])
def test_no_sampler_clips_x_hat_in_latent_space(tmp_path, teacher_clip):
  config = _smoke_config(path=_codec_file(tmp_path))
  config.guidance.teacher_clip = teacher_clip
  mesh = sharding.make_mesh({sharding.DATA_AXIS: -1})
  latent = ModelStore(str(tmp_path / 'w'), config, mesh=mesh, image_shape=LATENT,
                      num_classes=10)
  pixels = ModelStore(str(tmp_path / 'p'), _smoke_config(), mesh=mesh, image_shape=SHAPE,
                      num_classes=10)
  assert not latent.codec.is_identity and pixels.codec is codec.IDENTITY
  assert latent.data_shape == SHAPE and latent.image_shape == LATENT
  for use_w in (False, True):
    net = latent.denoiser(use_w=use_w)
    assert not net.clip_x
    for mode in ('guided', 'student', 'conditional'):
      assert not net.sampler_clips(mode) and not net.clips_branches(mode)
    assert pixels.denoiser(use_w=use_w).clip_x  # pixels clip, as before

  # The compiled samplers as the store makes them: x-hat = 3 everywhere. Unclipped, the
  # DDIM sample is 3 and decodes (z / 10) to 0.3; clipped it would be 1 -> 0.1.
  tenth = codec.FunctionCodec(encode_fn=lambda p, x: x, decode_fn=lambda p, z: z / 10.0,
                              params=None, image_shape=LATENT, latent_shape=LATENT, name='tenth')
  z_1 = jax.random.normal(jax.random.PRNGKey(0), (2, *LATENT))
  label = jnp.array([1, 2], jnp.int32)
  for clip_x, expected in ((False, 0.3), (True, 0.1)):
    net = _constant_x(3.0)
    net = net if clip_x else dataclasses.replace(net, clip_x=False)
    for sampler in ('ddim', 'stochastic'):
      fn = compiled_samplers.WithCodec(compiled_samplers.make_sample_fn(
          net, mode='guided', sampler=sampler, codec=tenth), None)
      x = fn({}, label, jnp.float32(2.0), z_1, jnp.int32(4), jax.random.PRNGKey(1))
      np.testing.assert_allclose(np.asarray(x), expected, rtol=1e-5)


def test_a_bad_codec_path_is_one_line_naming_the_key(tmp_path):
  teacher = os.path.join(smoke_workdir.REPO, 'gdistill', 'weights',
                         'fashion_mnist_teacher.msgpack')
  for path, message in (
      (str(tmp_path / 'none.msgpack'), r"codec.path='.*none.msgpack': no such file .*expected an "
                                       r'autoencoder file written by python -m gdistill.autoencoder'),
      (teacher, r"codec.path='.*fashion_mnist_teacher.msgpack': .*not an autoencoder file")):
    with pytest.raises(ConfigError, match=message) as e:
      open_codec(_smoke_config(path=path), SHAPE)
    assert '\n' not in str(e.value)
  with pytest.raises(ConfigError, match=r'the autoencoder takes images of shape \[28, 28, 1\], '
                                        r'the data \(fashion_mnist\) are \[32, 32, 3\]'):
    open_codec(_smoke_config(path=_codec_file(tmp_path)), (32, 32, 3))
  assert open_codec(_smoke_config(), SHAPE) is codec.IDENTITY


@pytest.mark.slow  # 2 minutes: CI time (configs/fashion_mnist_latent.py was run as written)
def test_a_latent_run_trains_samples_evaluates_and_translates_in_images(tmp_path,
                                                                        fashion_data_dir):
  """The stock pipeline on a (random, tiny) autoencoder's latents, as the user runs it
  (small: 2000 training images, one halving), then the CLIs on its exported student."""
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'gdistill.main', '--config=configs/smoke.py',
         f'--workdir={workdir}', f'--config.data.data_dir={fashion_data_dir}',
         f'--config.codec.path={_codec_file(tmp_path)}', '--config.model.ch_mult=(1,)',
         '--config.data.split=train[:2000]', "--config.stages=('teacher','stage1','stage2','eval')",
         '--config.stage2.start_steps=4', '--config.eval.student_steps=(2,)',
         '--config.eval.teacher_ddim_steps=(2,)', '--config.samples.student_w=(0.0,)']
  env = smoke_workdir.subprocess_env()
  proc = subprocess.run(cmd, cwd=smoke_workdir.REPO, env=env, capture_output=True, text=True,
                        timeout=3600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'latents: encoded fashion_mnist:train[:2000] (2000 images -> [7, 7, 4])' in proc.stdout
  store = ModelStore.open(str(workdir))
  assert store.image_shape == LATENT and store.data_shape == SHAPE
  for phase in ('teacher', 'stage1', 'stage2_n0002'):
    m = store.meta(phase)
    assert m['image_shape'] == list(LATENT) and m['codec']['kind'] == 'autoencoder'
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pixel_grid = tmp_path / 'pixels.png'  # the grid of 10 classes x 1 sample of 28x28 images
  grids.save_grid(np.zeros((10, 1, *SHAPE), np.float32), str(pixel_grid))
  grid = Image.open(workdir / 'samples' / 'stage2_n0002_steps2_w0.png')
  assert grid.size == Image.open(pixel_grid).size
  report = json.loads((workdir / 'eval' / 'report.json').read_text())
  assert report['protocol']['codec']['latent_shape'] == list(LATENT)
  assert {(r['model'], r['steps']) for r in report['rows']} >= {('student', 2)}

  # The CLIs take and give images: the exported student translates test images.
  student = tmp_path / 'student.msgpack'
  subprocess.run([sys.executable, '-m', 'gdistill.teacher_file', 'export',
                  f'--workdir={workdir}', '--phase=stage2_n0002', f'--output={student}'],
                 cwd=smoke_workdir.REPO, env=env, check=True, capture_output=True, timeout=900)
  from gdistill.data import open_source  # pylint: disable=g-import-not-at-top
  shoes = tmp_path / 'shoes.npz'
  test = open_source('fashion_mnist', split='test', data_dir=fashion_data_dir or None)
  np.savez(shoes, image=test.get(np.arange(8))['image'])
  moved = tmp_path / 't.npz'
  proc = subprocess.run([sys.executable, '-m', 'gdistill.translate', f'--model={student}',
                         '--steps=2', '--source_class=sneaker', '--target_class=9',
                         f'--input={shoes}', f'--output={moved}'], cwd=smoke_workdir.REPO,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = np.load(moved)
  assert got['input'].shape == got['image'].shape == (8, *SHAPE)
  # A pixel model cannot encode for a latent one.
  proc = subprocess.run([sys.executable, '-m', 'gdistill.translate', f'--model={student}',
                         '--encoder=gdistill/weights/fashion_mnist_teacher.msgpack', '--steps=2',
                         '--source_class=sneaker', '--target_class=9', f'--input={shoes}',
                         f'--output={tmp_path / "x.npz"}'], cwd=smoke_workdir.REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode != 0 and '(identity codec), but --model=' in proc.stderr
  assert not (tmp_path / 'x.npz').exists()


def test_shipped_autoencoder_reconstructs_within_its_stated_error(fashion_data_dir):
  """encode -> decode of the test images its sidecar's RMSE was measured on (python -m
  gdistill.autoencoder: the evaluation's 1000-image subset, uint8 pixels / 255): within 1 %."""
  from gdistill import teacher_file  # pylint: disable=g-import-not-at-top
  from gdistill.config_base import config_file  # pylint: disable=g-import-not-at-top
  from gdistill.data import open_source  # pylint: disable=g-import-not-at-top
  from gdistill.eval import features, metrics  # pylint: disable=g-import-not-at-top
  ae = codec.load(SHIPPED)
  measured = teacher_file.read_info(SHIPPED)['measured']
  assert ae.model_shape() == LATENT and tuple(ae.image_shape) == SHAPE
  assert os.path.getsize(SHIPPED) + os.path.getsize(SHIPPED[:-len('.msgpack')] + '.json') <= 10e6
  e = config_file(os.path.join(smoke_workdir.REPO, 'configs', 'fashion_mnist_autoencoder.py')).eval
  source = open_source('fashion_mnist', split='test', data_dir=fashion_data_dir or None)
  real = source.get(features.subset_indices(source.num_examples, e.num_samples, e.seed))['image']
  x = real.astype(np.float32) / 127.5 - 1.0
  def round_trip(b):
    latents = ae.encode(b)
    return ae.decode(latents), latents
  round_trip = jax.jit(round_trip)  # one compilation; ae.encode alone would run op by op
  outs = [round_trip(x[i:i + 250]) for i in range(0, len(x), 250)]
  recon = np.concatenate([np.asarray(r) for r, _ in outs])
  diff = metrics.quantize_uint8(recon).astype(np.float64) - real
  rmse = float(np.sqrt(np.mean(diff ** 2)) / 255.0)
  assert rmse <= 1.01 * measured['recon_rmse'], (rmse, measured)
  latents = np.concatenate([np.asarray(l) for _, l in outs[:2]])  # the first 500 images
  assert 0.8 < latents.std() < 1.25, latents.std()  # its scale gives unit-variance latents


def test_a_teacher_source_declares_its_own_codec(tmp_path):
  """ForeignTeacher.codec (e.g. a FunctionCodec around Stable Diffusion's VAE) is the run's
  codec; codec.path beside it is refused; its image shape must be the data's."""
  import types  # pylint: disable=g-import-not-at-top
  ae = codec.load(_codec_file(tmp_path))
  fn_codec = codec.FunctionCodec(encode_fn=ae.encode_with, decode_fn=ae.decode_with,
                                 params=ae.params, image_shape=SHAPE, latent_shape=LATENT,
                                 name='my-vae')
  foreign = types.SimpleNamespace(codec=fn_codec)
  config = _smoke_config()
  config.teacher.source = 'python:my.module:factory'
  assert open_codec(config, SHAPE, foreign) is fn_codec
  assert open_codec(config, SHAPE, types.SimpleNamespace(codec=None)) is codec.IDENTITY
  with pytest.raises(ConfigError,
                     match=r"teacher.source='python:my.module:factory': its codec takes images "
                           r'of shape \[28, 28, 1\], the data \(fashion_mnist\) are \[32, 32, 3\]'):
    open_codec(config, (32, 32, 3), foreign)
  config.codec.path = 'ae.msgpack'
  with pytest.raises(ConfigError, match=r"codec.path='ae.msgpack': a teacher.source teacher "
                                        r'declares its own codec'):
    open_codec(config, SHAPE, foreign)
  # The store's codec and networks: the factory's, unclipped.
  mesh = sharding.make_mesh({sharding.DATA_AXIS: -1})
  store = ModelStore(str(tmp_path / 'w'), _smoke_config(), mesh=mesh, image_shape=LATENT,
                     num_classes=10, codec=fn_codec)
  assert store.codec_meta() == {'codec': {'kind': 'function', 'name': 'my-vae',
                                          'image_shape': [28, 28, 1], 'latent_shape': [7, 7, 4],
                                          'clip_x': False}}
  x = jnp.zeros((2, *SHAPE))
  np.testing.assert_allclose(np.asarray(fn_codec.decode(fn_codec.encode(x))),
                             np.asarray(ae.decode(ae.encode(x))), atol=1e-6)
