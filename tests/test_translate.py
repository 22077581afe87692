"""Image-to-image translation: the DDIM encoder, its distillation target, the
translation function and stage, and the ``gdistill.translate`` command line.

The maths tests use the exact denoiser of Gaussian data (``gd_testlib``); the
pipeline tests share one smoke workdir (``smoke_workdir.py``), trained once per
session in a subprocess with two CPU devices.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gdistill import diffusion, encoder, samplers, translation
from gdistill.denoiser import from_apply
from gd_testlib import GaussianData
import smoke_workdir

L = diffusion.logsnr_schedule_cosine


class TwoClassGaussian:
  """Class-conditional data x | c ~ N(mu_c, s^2 I), with N(0, s^2 I) standing in for the
  unconditional model: exact denoisers per condition, guided as the teacher is."""

  def __init__(self, s=0.4):
    self.data = {0: GaussianData(mu=-0.3, s=s), 1: GaussianData(mu=0.2, s=s),
                 'null': GaussianData(mu=0.0, s=s)}

  def denoise_fn(self, label, w=0.0):
    cond, null = self.data[label], self.data['null']
    return lambda z, t: diffusion.guided(cond=cond.denoise_fn(z, t), uncond=null.denoise_fn(z, t),
                                         w=w)


def _images(shape=(6, 4, 4, 1), seed=0, data=None):
  data = data or GaussianData()
  return data.mu + data.s * jax.random.normal(jax.random.PRNGKey(seed), shape)


# ---- the DDIM encoder ----------------------------------------------------------------

@pytest.mark.parametrize('w', [0.0, 2.0])
def test_encode_then_decode_same_condition_returns_the_input(w):
  classes = TwoClassGaussian()
  den = classes.denoise_fn(1, w)
  x = _images(data=classes.data[1])
  errors = {}
  for n in (256, 1024, 4096):
    z_1 = samplers.ddim_encode(den, x, num_steps=n)
    errors[n] = float(jnp.abs(samplers.ddim_sample(den, z_1, num_steps=n, clip=False) - x).max())
  # DDIM is first order: the round-trip error shrinks ~4x per 4x steps, to tight tolerance.
  assert errors[4096] < 2e-3, errors
  assert errors[1024] / errors[4096] > 3.0, errors
  assert errors[256] / errors[1024] > 3.0, errors


def test_encoder_maps_the_data_distribution_to_the_prior():
  data = GaussianData(mu=0.3, s=0.5)
  x = _images((512, 4, 4, 1), data=data)
  z_1 = samplers.ddim_encode(data.denoise_fn, x, num_steps=256)
  assert abs(float(z_1.mean())) < 0.05
  assert abs(float(z_1.std()) - 1.0) < 0.05


def test_encode_clean_start_skips_the_network_at_s0():
  def den(z, t):
    return jnp.zeros_like(z) + jnp.where(t == 0, jnp.nan, 0.0)

  x = _images()
  z = samplers.ddim_encode(den, x, num_steps=4, clean_start=True)
  assert bool(jnp.all(jnp.isfinite(z)))  # the NaN at t = 0 never reached the result
  z = samplers.ddim_encode(den, x, num_steps=4, clean_start=False)
  assert not bool(jnp.all(jnp.isfinite(z)))


def test_encode_steps_are_traced():
  data = GaussianData()
  f = jax.jit(lambda x, n: samplers.ddim_encode(data.denoise_fn, x, num_steps=n))
  x = _images()
  a, b = f(x, jnp.int32(8)), f(x, jnp.int32(16))
  assert f._cache_size() == 1
  assert not np.allclose(a, b)


# ---- encoder distillation ------------------------------------------------------------

def _teacher_steps(x_fn, z_s, s, m, clean_start):
  """Two reverse DDIM steps of 1/(2M), written out."""
  t1, t2 = s + 0.5 / m, s + 1.0 / m
  x1 = z_s if (clean_start and float(s[0]) == 0.0) else x_fn(z_s, s)
  z1 = diffusion.ddim_step(z_t=z_s, x_hat=x1, logsnr_t=L(s), logsnr_s=L(t1))
  return diffusion.ddim_step(z_t=z1, x_hat=x_fn(z1, t1), logsnr_t=L(t1), logsnr_s=L(t2))


@pytest.mark.parametrize('clean_start', [True, False])
@pytest.mark.parametrize('m, i', [(4, 0), (4, 1), (4, 3), (4, 6), (16, 0), (16, 17), (16, 30)])
def test_encoder_target_lands_one_student_step_on_two_teacher_steps(m, i, clean_start):
  data = GaussianData()
  x = _images()
  s = jnp.full((x.shape[0],), i / (2 * m), jnp.float32)
  z_s = diffusion.diffuse(x=x, eps=jax.random.normal(jax.random.PRNGKey(1), x.shape), logsnr=L(s))
  x_tilde = encoder.encoder_target(data.denoise_fn, z_s=z_s, s=s, student_steps=m,
                                   clean_start=clean_start)
  student = diffusion.ddim_step(z_t=z_s, x_hat=x_tilde, logsnr_t=L(s), logsnr_s=L(s + 1.0 / m))
  teacher = _teacher_steps(data.denoise_fn, z_s, s, m, clean_start)
  # At s = 0, x_tilde = z_0 - sigma_0 eps_eff with sigma_0 = 4.5e-5: float32 keeps ~3 digits
  # of eps_eff, the same rounding a network's x_hat has there.
  atol = 2e-3 if i == 0 else 2e-6
  np.testing.assert_allclose(student, teacher, atol=atol)


def test_encoder_target_chained_reproduces_the_2m_step_encoder():
  """A student that outputs the target at every step encodes like the teacher at 2M steps."""
  data = GaussianData()
  x = _images()
  m = 8

  def oracle(z, s):
    s = jnp.broadcast_to(s, (z.shape[0],))
    return encoder.encoder_target(data.denoise_fn, z_s=z, s=s, student_steps=m, clean_start=True)

  student = samplers.ddim_encode(oracle, x, num_steps=m, clean_start=False)
  teacher = samplers.ddim_encode(data.denoise_fn, x, num_steps=2 * m, clean_start=True)
  np.testing.assert_allclose(student, teacher, atol=3e-3)


def test_encoder_target_is_the_decoder_distillation_formula_reversed():
  """distillation_target inverts ddim_step in either time direction."""
  z_s = _images(seed=3)
  x_hat = _images(seed=4)
  ls, lt = L(jnp.full((6,), 0.3)), L(jnp.full((6,), 0.55))
  z_t = diffusion.ddim_step(z_t=z_s, x_hat=x_hat, logsnr_t=ls, logsnr_s=lt)  # reverse step
  back = diffusion.distillation_target(z_t=z_s, z_target=z_t, logsnr_t=ls, logsnr_target=lt)
  np.testing.assert_allclose(back, x_hat, atol=1e-5)


@pytest.mark.parametrize('grid, values', [
    ('deterministic', {0.0, 0.25, 0.5, 0.75}),
    ('both', {k / 8 for k in range(7)}),
])
def test_encoder_time_grid(grid, values):
  s = encoder.encoder_time_grid(jax.random.PRNGKey(0), 4096, student_steps=4, grid=grid)
  assert set(np.round(np.asarray(s), 6).tolist()) == {round(v, 6) for v in values}
  with pytest.raises(ValueError, match='time_grid'):
    encoder.encoder_time_grid(jax.random.PRNGKey(0), 4, student_steps=4, grid='nope')


def test_encoder_distill_loss_runs_and_traces_the_step_count():
  """The loss of the (exact) teacher as student is finite; halvings share one trace."""
  data = GaussianData()

  def apply_fn(variables, z, logsnr, label, *, train=False, rngs=None, w=None):
    del label, train, rngs, w
    # An 'x'-parameterised "network" computing the exact denoiser (scaled by the param).
    return variables['params']['scale'] * data.x_hat(z, logsnr)

  batch = {'image': _images((8, 4, 4, 1)), 'label': jnp.zeros((8,), jnp.int32)}
  params = {'scale': jnp.float32(1.0)}
  loss = jax.jit(lambda p, teacher: encoder.encoder_distill_loss(
      p, teacher, batch, jax.random.PRNGKey(0),
      student=from_apply(apply_fn, mean_type='x', num_classes=1), encode_w=0.0,
      grid='both', weighting='snr_plus_one')[0])
  teacher = {'params': params, 'num_steps': jnp.int32(4), 'clean_start': jnp.bool_(False)}
  value = float(loss(params, teacher))
  assert np.isfinite(value) and value > 0  # the 1-step denoiser is not the 2-step target
  loss(params, dict(teacher, num_steps=jnp.int32(2)))
  assert loss._cache_size() == 1


# ---- translation -----------------------------------------------------------------------

def test_translate_same_class_is_identity_other_class_moves_toward_it():
  classes = TwoClassGaussian(s=0.15)
  x = _images((64, 4, 4, 1), data=classes.data[0])
  kw = dict(encode_steps=2048, decode_steps=2048)
  same = translation.translate(classes.denoise_fn(0), classes.denoise_fn(0), x, **kw)
  np.testing.assert_allclose(same, x, atol=3e-3)
  other = translation.translate(classes.denoise_fn(0), classes.denoise_fn(1), x, **kw)
  # Gaussian -> Gaussian of equal spread: the ODE maps x to x + (mu_1 - mu_0).
  np.testing.assert_allclose(other, x + 0.5, atol=3e-3)


def test_route_nfe():
  r = translation.ddim_route(64)
  assert (r.encoder, r.decoder, r.clean_start) == ('stage1', 'stage1', True)
  assert r.nfe == 63 + 64
  assert translation.ddim_route(8, 'teacher').nfe == 2 * 7 + 2 * 8
  assert translation.Route('d', 'encoder_n0004', 'stage2_n0004', 4, False).nfe == 8


def test_quality_counts_target_predictions_and_distances():
  def classify(u):  # features: the mean pixel; class 1 iff the image is bright
    m = u.reshape(u.shape[0], -1).mean(-1, keepdims=True) / 255.0
    return m, np.concatenate([1 - m, m], -1)
  dark = -np.ones((4, 2, 2, 1), np.float32)
  out = dark.copy()
  out[:3] = 1.0  # three of four turned bright
  q = translation.quality(classify, dark, out, target=1, source=0)
  assert q['target_rate'] == 0.75 and q['source_rate'] == 0.25 and q['num_images'] == 4
  np.testing.assert_allclose(q['pixel_rmse'], np.sqrt(0.75))
  np.testing.assert_allclose(q['feature_l2'], 0.75)


def test_saved_classifier_is_the_eval_stages_file(tmp_path):
  from gdistill.config_base import base_config  # pylint: disable=g-import-not-at-top
  from gdistill.eval import classifier as classifier_lib  # pylint: disable=g-import-not-at-top
  config = base_config()
  assert translation.saved_classifier(config, str(tmp_path)) is None
  params = classifier_lib.FeatureClassifier(num_classes=10).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1), jnp.uint8))['params']
  path = translation.classifier_path(config, str(tmp_path))
  assert path == str(tmp_path / 'eval' / 'classifier.npz')
  classifier_lib.save_classifier(path, params, {'dataset': 'fashion_mnist', 'num_classes': 10,
                                                'image_shape': (28, 28, 1), 'test_accuracy': 0.9})
  feats, logits = translation.saved_classifier(config, str(tmp_path))(
      np.zeros((3, 28, 28, 1), np.uint8))
  assert logits.shape == (3, 10) and feats.shape[0] == 3


@pytest.mark.parametrize('key, value, fragment', [
    ('distilled_steps', (2,), 'translate.distilled_steps=(2,): expected distilled encoder step '
                              'counts (translate.encoder_start_steps=32 and encoder_min_steps=4 '
                              'give [4, 8, 16])'),
    ('distilled_steps', (3,), 'expected stage-2 student step counts'),
    ('pairs', ((7,),), 'translate.pairs=((7,),): expected (source, target) pairs'),
    ('encoder_start_steps', 12, 'translate.encoder_start_steps=12: expected a power of two'),
    ('encoder_min_steps', 32, 'translate.encoder_start_steps=32: expected at least 2 *'),
    ('w', -1.0, 'translate.w=-1.0: expected a guidance weight >= 0'),
    ('encoder.batch_size', 3, 'translate.encoder.batch_size=3: expected a multiple of the number'
                              ' of devices (2)'),
    ('encoder.time_grid', 'fine', 'translate.encoder.time_grid=\'fine\''),
    ('encode_steps', -1, 'translate.encode_steps=-1: expected a number of DDIM steps >= 1, or 0'),
])
def test_config_validation_of_the_translate_section(key, value, fragment):
  from gdistill import config_validation  # pylint: disable=g-import-not-at-top
  from gdistill.config_base import base_config  # pylint: disable=g-import-not-at-top
  config = base_config()
  config.stages = ('teacher', 'stage1', 'stage2', 'translate')
  config_validation.validate(config, num_devices=2)
  section, name = (config.translate, key) if '.' not in key else (
      config.translate.encoder, key.split('.')[1])
  section[name] = value
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate(config, num_devices=2)
  assert fragment in str(e.value)
  config.stages = ('teacher', 'stage1', 'stage2')  # not translating: not checked
  config_validation.validate(config, num_devices=2)


# ---- image files -------------------------------------------------------------------------

def test_image_io_round_trips(tmp_path):
  from gdistill import image_io  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = (rng.integers(0, 255, (5, 28, 28, 1)).astype(np.float32) / 127.5 - 1.0)
  path = str(tmp_path / 's.png')
  image_io.write_samples(path, x, np.zeros(5), meta={})
  np.testing.assert_allclose(image_io.read_images(path, (28, 28, 1)), x, atol=1e-6)
  path = str(tmp_path / 's.npz')
  image_io.write_samples(path, x, np.zeros(5), meta={'steps': 4})
  np.testing.assert_allclose(image_io.read_images(path, (28, 28, 1)), x, atol=1e-6)
  tiles = str(tmp_path / 't.png')  # two images side by side, no padding
  Image.fromarray(np.concatenate([np.full((28, 28), 0, np.uint8),
                                  np.full((28, 28), 255, np.uint8)], 1)).save(tiles)
  got = image_io.read_images(tiles, (28, 28, 1))
  assert got.shape == (2, 28, 28, 1) and got[0].max() == -1 and got[1].min() == 1
  bad = str(tmp_path / 'b.png')
  Image.fromarray(np.zeros((30, 29), np.uint8)).save(bad)
  with pytest.raises(ValueError, match=r'^--input=.*29x30 PNG'):
    image_io.read_images(bad, (28, 28, 1))


@pytest.mark.parametrize('value, fragment', [(np.nan, 'NaN or infinite'),
                                             (np.inf, 'NaN or infinite'),
                                             (3.0, 'range over')])
def test_npz_images_with_bad_values_are_refused(tmp_path, value, fragment):
  from gdistill import image_io  # pylint: disable=g-import-not-at-top
  x = np.zeros((2, 28, 28, 1), np.float32)
  x[1, 3, 4, 0] = value
  path = str(tmp_path / 'x.npz')
  np.savez(path, image=x)
  with pytest.raises(ValueError, match=rf'^--input={path}: .*{fragment}') as e:
    image_io.read_images(path, (28, 28, 1))
  assert '\n' not in str(e.value)


# ---- the command line and the pipeline stage -----------------------------------------------

REPO = smoke_workdir.REPO


def _cli(*args, timeout=300):
  return subprocess.run([sys.executable, '-m', 'gdistill.translate', *args], cwd=REPO,
                        env=smoke_workdir.subprocess_env(), capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.parametrize('args, fragment', [
    (['--source_class=7', '--target_class=9', '--steps=4', '--input=x.png', '--output=o.png'],
     '--workdir is required'),
    (['--workdir=/nonexistent', '--source_class=7', '--target_class=9', '--steps=4',
      '--input=x.png', '--output=o.gif'], '--output=o.gif: expected a file name ending in .png'),
    (['--workdir=/nonexistent', '--source_class=7', '--target_class=9', '--steps=4',
      '--input=x.png', '--output=o.png'], 'no config.json'),
    (['--workdir=/x', '--source_class=7', '--target_class=9', '--steps=0', '--input=x.png',
      '--output=o.png'], '--steps=0: expected a positive'),
])
def test_cli_usage_errors_are_one_line(args, fragment):
  proc = _cli(*args, timeout=60)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and fragment in lines[0], proc.stderr


@pytest.fixture(scope='module')
def workdir(fashion_data_dir):
  return smoke_workdir.get(fashion_data_dir)


@pytest.fixture(scope='module')
def fake(tmp_path_factory):
  return smoke_workdir.fake_workdir(str(tmp_path_factory.mktemp('fake') / 'workdir'))


def test_without_a_distilled_encoder_the_stage1_model_encodes_in_encode_steps(tmp_path):
  from gdistill.model_store import ModelStore  # pylint: disable=g-import-not-at-top
  path = smoke_workdir.fake_workdir(str(tmp_path / 'w'), phases=('teacher', 'stage1',
                                                                 'stage2_n0004', 'stage2_n0002'))
  spec = importlib.util.spec_from_file_location(
      'smoke', os.path.join(smoke_workdir.REPO, 'configs', 'smoke.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.translate.distill_encoder = False
  work = ModelStore.open(path, config)
  route = translation.distilled_route(work, 4, encode_steps=32)
  assert (route.encoder, route.decoder, route.clean_start) == ('stage1', 'stage2_n0004', True)
  assert route.encoder_steps == 32 and route.nfe == 31 + 4
  assert translation.distilled_route(work, 4).encoder_steps == 4  # 0: the decoder's steps
  config.translate.encode_steps = 16
  routes = translation.stage_routes(config, work)  # ddim_steps 8, distilled_steps (2, 4)
  assert [(r.name, r.encoder_steps) for r in routes] == [
      ('ddim8', 8), ('distilled2', 16), ('distilled4', 16)]
  with pytest.raises(translation.CheckpointError, match='no 4-step distilled encoder'):
    translation.distilled_route(work, 4, require_encoder=True)


@pytest.mark.slow
def test_stage_writes_grids(workdir):
  out = os.path.join(workdir, translation.TRANSLATE_DIR)
  with open(os.path.join(out, 'grids.json')) as f:
    index = json.load(f)
  assert sorted(index) == ['6-shirt_to_0-t_shirt_top.png', '7-sneaker_to_9-ankle_boot.png']
  for name, rows in index.items():
    assert rows[0] == 'input' and rows[1].startswith('ddim8')
    assert [r.split()[0] for r in rows[2:]] == ['distilled2', 'distilled4']
    assert 'encoder_n0002' in rows[2] and 'stage2_n0004' in rows[3]
    with Image.open(os.path.join(out, name)) as im:
      # 4 rows x 2 columns of 28x28 tiles with 2-pixel padding, upscaled 2x.
      assert im.size == (2 * (2 * 30 + 2), 2 * (4 * 30 + 2))
  phases = os.listdir(os.path.join(workdir, 'checkpoints'))
  assert {'encoder_n0004', 'encoder_n0002'} <= set(phases)


@pytest.mark.slow
def test_cli_translates_a_grid_png(workdir, tmp_path):
  src = np.full((3, 28, 28, 1), -1.0, np.float32)
  src[:, 8:20, 4:24] = 1.0
  from gdistill import image_io  # pylint: disable=g-import-not-at-top
  inp = str(tmp_path / 'in.png')
  image_io.write_samples(inp, src, np.zeros(3), meta={})
  for model, out in (('distilled', 'o.npz'), ('ddim', 'o.png')):
    proc = _cli(f'--workdir={workdir}', '--source_class=sneaker', '--target_class=9',
                '--steps=4', '--w=1', f'--model={model}', f'--input={inp}',
                f'--output={tmp_path / out}')
    assert proc.returncode == 0, proc.stderr[-2000:]
  with np.load(tmp_path / 'o.npz') as d:
    assert d['input'].shape == d['image'].shape == (3, 28, 28, 1)
    assert str(d['route']) == 'distilled4' and int(d['nfe_per_image']) == 8
  with Image.open(tmp_path / 'o.png') as im:
    assert im.size == (2 * (3 * 30 + 2), 2 * (2 * 30 + 2))


@pytest.mark.parametrize('args, fragment', [
    (['--source_class=12', '--target_class=9', '--steps=4'], '--source_class=12: expected a class'),
    (['--source_class=sneaker', '--target_class=boots', '--steps=4'], '--target_class=boots'),
    (['--source_class=7', '--target_class=9', '--steps=3', '--model=distilled'],
     'no 3-step student (it holds: teacher; stage1; students for 2, 4 steps; encoders for 2, 4'),
    (['--source_class=7', '--target_class=9', '--steps=4', '--w=-2'], '--w=-2.0: expected'),
    (['--source_class=7', '--target_class=9', '--steps=4', '--input=missing.npz'],
     '--input=missing.npz: no such file'),
])
def test_cli_errors_name_what_exists(fake, tmp_path, args, fragment):
  inp = str(tmp_path / 'in.npz')
  np.savez(inp, image=np.zeros((2, 28, 28), np.uint8))
  proc = _cli(f'--workdir={fake}', f'--input={inp}', f'--output={tmp_path}/o.png', *args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and fragment in lines[0], proc.stderr[-2000:]
