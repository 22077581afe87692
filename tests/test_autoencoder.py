"""The codec between images and the diffusion (gdistill.codec), the autoencoder
(gdistill.models.autoencoder) and its training command (gdistill.autoencoder)."""

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
from gdistill import codec, teacher_file
from gdistill.checkpoint import CheckpointError
from gdistill.models import autoencoder

ARCH = {'ch': 8, 'ch_mult': (1, 2), 'num_res_blocks': 1, 'latent_ch': 4, 'out_ch': 1}
SHAPE = (28, 28, 1)


def _codec(seed=0, **kw):
  params = random_like(codec.abstract_params(ARCH, SHAPE), seed=seed)
  return codec.AutoencoderCodec(arch=ARCH, params=params, image_shape=SHAPE,
                                **{'scale': 0.5, 'shift': 0.1, **kw})


def test_autoencoder_shapes():
  module = autoencoder.Autoencoder(**ARCH)
  x = jnp.zeros((3, *SHAPE))
  variables = module.init(jax.random.PRNGKey(0), x)
  recon, mean, logvar = module.apply(variables, x)
  assert recon.shape == x.shape and mean.shape == logvar.shape == (3, 7, 7, 4)
  sampled, _, _ = module.apply(variables, x, jax.random.PRNGKey(1))
  assert not np.allclose(sampled, recon)  # the posterior sample differs from its mean
  assert autoencoder.latent_shape(SHAPE, ch_mult=(1, 2), latent_ch=4) == (7, 7, 4)
  with pytest.raises(ValueError, match=r'image shape \(30, 30, 1\): height and width must be '
                                       r'multiples of 2\^len\(ch_mult\) = 4'):
    autoencoder.latent_shape((30, 30, 1), ch_mult=(1, 2), latent_ch=4)


def test_identity_codec_is_pixels_with_clipping():
  x = jnp.linspace(-1.0, 1.0, 28 * 28).reshape(1, *SHAPE)
  assert codec.from_path('') is codec.IDENTITY
  assert codec.IDENTITY.encode(x) is x and codec.IDENTITY.decode(x) is x
  assert codec.IDENTITY.clip_x and codec.IDENTITY.model_shape(SHAPE) == SHAPE


def test_autoencoder_codec_scales_and_shifts_the_posterior_mean():
  c = _codec()
  x = jax.random.uniform(jax.random.PRNGKey(2), (2, *SHAPE), minval=-1.0, maxval=1.0)
  mean, _ = autoencoder.Autoencoder(**ARCH).apply({'params': c.params}, x, method='encode')
  z = c.encode(x)
  np.testing.assert_allclose(z, (mean - 0.1) * 0.5, rtol=1e-6, atol=1e-6)
  direct = autoencoder.Autoencoder(**ARCH).apply({'params': c.params}, mean, method='decode')
  np.testing.assert_allclose(c.decode(z), direct, rtol=1e-5, atol=1e-5)
  assert not c.clip_x and c.model_shape() == (7, 7, 4)


def test_codec_file_round_trips_and_refuses_other_files(tmp_path):
  c = _codec(seed=3)
  path = str(tmp_path / 'ae.msgpack')
  info = codec.save(path, c, measured={'recon_rmse': 0.01})
  assert info['codec'] == c.describe() and info['measured'] == {'recon_rmse': 0.01}
  back = codec.load(path)
  assert (back.scale, back.shift, back.image_shape, back.arch) == (0.5, 0.1, SHAPE, ARCH)
  x = jax.random.uniform(jax.random.PRNGKey(4), (2, *SHAPE), minval=-1.0, maxval=1.0)
  np.testing.assert_array_equal(back.encode(x), c.encode(x))
  # A teacher file is not a codec; a truncated codec file names itself.
  teacher = os.path.join(smoke_workdir.REPO, 'gdistill', 'weights',
                         'fashion_mnist_teacher.msgpack')
  with pytest.raises(CheckpointError, match='not an autoencoder file'):
    codec.load(teacher)
  with open(path, 'r+b') as f:
    f.truncate(100)
  with pytest.raises(CheckpointError, match=r'ae\.msgpack: truncated or corrupted'):
    codec.load(path)
  side = teacher_file.sidecar_path(path)
  with open(side) as f:
    broken = json.load(f)
  del broken['codec']['scale']
  with open(side, 'w') as f:
    json.dump(broken, f)
  with pytest.raises(CheckpointError, match='"codec" entry is incomplete'):
    codec.load(path)


def _cli(*args, cwd=smoke_workdir.REPO):
  return subprocess.run([sys.executable, '-m', 'gdistill.autoencoder', *args], cwd=cwd,
                        capture_output=True, text=True, env=smoke_workdir.subprocess_env(),
                        timeout=600)


@pytest.mark.slow  # 60 s: CI time
def test_the_command_trains_measures_writes_and_keeps_the_codec(tmp_path, fashion_data_dir):
  """The real path, small: the loop on Fashion-MNIST, the measurement with the shipped
  classifier, the file and its copy; a rerun loads the finished phase and keeps the file."""
  work, out = tmp_path / 'ae', tmp_path / 'copy' / 'ae.msgpack'
  args = ['--config=configs/fashion_mnist_autoencoder.py', f'--workdir={work}',
          f'--config.data.data_dir={fashion_data_dir}', '--config.autoencoder.num_steps=6',
          '--config.autoencoder.checkpoint_every=3', '--config.autoencoder.ch=8',
          '--config.autoencoder.scale_images=256', '--config.eval.num_samples=200',
          '--config.eval.reference_examples=2000', '--config.data.eval_split=test[:1000]']
  proc = _cli(*args, f'--output={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = teacher_file.read_info(str(out))
  m = info['measured']
  assert info['codec']['latent_shape'] == [7, 7, 4] and info['steps'] == 6
  assert m['fid_images'] == 200 and m['recon_fid'] > m['real_fid'] > 0
  assert 0 < m['recon_rmse'] < 1 and m['latent_std'] > 0
  np.testing.assert_allclose(info['codec']['scale'], 1 / m['latent_std'])
  loaded = codec.load(str(out))
  x = np.zeros((1, *SHAPE), np.float32)
  assert loaded.decode(loaded.encode(x)).shape == x.shape
  before = os.stat(work / 'autoencoder.msgpack').st_mtime_ns
  proc = _cli(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'autoencoder: already finished (6 steps)' in proc.stdout + proc.stderr
  assert os.stat(work / 'autoencoder.msgpack').st_mtime_ns == before


@pytest.mark.parametrize('key, value, fragment', [
    ('ch_mult', (1, 2, 2), 'autoencoder.ch_mult=(1, 2, 2): image shape (28, 28, 1): height and '
                           'width must be multiples'),
    ('kl_weight', -1.0, 'autoencoder.kl_weight=-1.0: expected a number >= 0'),
    ('out_ch', 3, "autoencoder.out_ch=3: expected the images' 1 channels"),
    ('num_steps', 0, 'autoencoder.num_steps=0: expected a positive integer'),
    ('batch_size', 63, 'autoencoder.batch_size=63: expected a multiple of the number of devices'),
])
def test_bad_settings_fail_with_one_line_before_writing(tmp_path, fashion_data_dir, key, value,
                                                        fragment):
  import importlib.util  # pylint: disable=g-import-not-at-top
  from gdistill import autoencoder as command  # pylint: disable=g-import-not-at-top
  from gdistill.config_validation import ConfigError  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('ae', os.path.join(
      smoke_workdir.REPO, 'configs', 'fashion_mnist_autoencoder.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.data_dir = fashion_data_dir
  config.autoencoder[key] = value
  work = tmp_path / 'ae'
  with pytest.raises(ConfigError) as e:
    command.train_autoencoder(config, str(work))
  assert fragment in str(e.value)
  assert not work.exists()
