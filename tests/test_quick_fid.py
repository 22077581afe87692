"""gdistill.eval.quick_fid: a cheap FID of sampling parameters, and a phase's curve from
its checkpoints (the smoke-sized U-Net on 8x8 images, a fake feature network)."""

import importlib.util
import math
import os

import jax
import numpy as np
import pytest

from gd_testlib import random_like
from gdistill import checkpoint, compiled_samplers, networks, teacher_file
from gdistill.denoiser import for_gdistill_net
from gdistill.eval import features, metrics, quick_fid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (8, 8, 1)
K = 10


def _config():
  spec = importlib.util.spec_from_file_location('smoke', os.path.join(REPO, 'configs', 'smoke.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _pooled_net():
  """Features: the 8x8 image average-pooled to 4x4 (16-d) in [-1, 1]; 3 fake logits."""
  def fn(images):
    x = images.astype(np.float32) / 127.5 - 1.0
    f = x.reshape(len(x), 4, 2, 4, 2).mean((2, 4)).reshape(len(x), -1)
    return f, np.stack([f.mean(1), -f.mean(1), f.std(1)], 1)
  return features.FeatureNet('pooled', fn, {'name': 'pooled'}, 'pooled-v1')


def _reference(net, n=400):
  real = np.clip(0.5 * np.random.default_rng(0).standard_normal((n, *SHAPE)), -1, 1)
  feats, logits = net.fn(metrics.quantize_uint8(real))
  mu, sigma = metrics.feature_statistics(feats)
  return {'mu': mu, 'sigma': sigma, 'n': n, 'subset_features': feats[:64],
          'subset_logits': logits[:64]}


@pytest.fixture(scope='module')
def quick():
  config = _config()
  net = networks.make_net(config, num_classes=K, out_ch=SHAPE[-1], use_w=False)
  feature_net = _pooled_net()
  sampler = compiled_samplers.make_sample_fn(
      for_gdistill_net(net, mean_type=config.diffusion.mean_type, num_classes=K),
      mode='guided', sampler='ddim')
  q = quick_fid.QuickFid(feature_net=feature_net, reference=_reference(feature_net),
                         sample_fn=sampler, image_shape=SHAPE, num_classes=K, num_samples=24,
                         batch_size=16, num_steps=2, w_values=(0.0, 1.0), seed=0)
  abstract = teacher_file.abstract_params_for(config, use_w=False, num_classes=K,
                                              image_shape=SHAPE)
  return config, q, abstract


def test_quick_fid_is_finite_repeatable_and_tracks_the_params(quick):
  _, q, abstract = quick
  params = random_like(abstract, seed=0)
  a = q(params)
  assert set(a) >= {'fid_w0', 'fid_w1', 'is_w0', 'precision_w1', 'recall_w1', 'seconds',
                    'sample_seconds'}
  assert all(math.isfinite(v) for v in a.values())
  assert a['fid_w0'] > 0 and q.compile_seconds > 0 and q.nfe == 4
  assert a['fid_w0'] != a['fid_w1']  # guidance changes the samples
  b = q(params)  # the same noise and labels: the same numbers
  for key in ('fid_w0', 'fid_w1', 'is_w0', 'precision_w0', 'recall_w1'):
    assert a[key] == b[key], key
  c = q(random_like(abstract, seed=1))
  assert c['fid_w0'] != a['fid_w0'] and c['fid_w1'] != a['fid_w1']
  assert q.last_images[1.0].shape == (24, *SHAPE)
  assert q.protocol()['feature_fingerprint'] == 'pooled-v1'


def test_arguments_are_checked(quick):
  _, q, _ = quick
  kw = dict(feature_net=q.feature_net, sample_fn=q.sample_fn, image_shape=SHAPE, num_classes=K)
  with pytest.raises(ValueError, match='subset_features'):
    quick_fid.QuickFid(reference={'mu': 0, 'sigma': 0}, **kw)
  with pytest.raises(ValueError, match='num_samples=1'):
    quick_fid.QuickFid(reference=q.reference, num_samples=1, **kw)
  with pytest.raises(ValueError, match='repeated'):
    quick_fid.QuickFid(reference=q.reference, w_values=(1, 1.0), **kw)
  assert quick_fid.w_key('fid', 0.3) == 'fid_w0.3' and quick_fid.w_key('is', 4) == 'is_w4'


def test_floor_at_the_sample_count(quick):
  _, q, _ = quick
  floor = quick_fid.floor_metrics(q.reference, q.reference, num_samples=32)
  assert floor['num_samples'] == 32 and math.isfinite(floor['fid'])


def test_estimated_minutes_extrapolate_the_start():
  assert quick_fid.estimated_minutes([100, 200, 300], [1060.0, 1120.0, 1300.0]) == \
      pytest.approx([1.0, 2.0, 5.0])
  assert quick_fid.estimated_minutes([100, 200], [None, 5.0]) == [None, None]


def test_checkpoint_curve_table_and_plot(quick, tmp_path):
  config, q, abstract = quick
  directory = str(tmp_path / 'checkpoints' / 'teacher')
  mgr = checkpoint.manager(directory, max_to_keep=5)
  meta = dict(teacher_file.network_info(config, use_w=False, num_classes=K, image_shape=SHAPE),
              phase='teacher', has_ema=False)
  for step in (2, 4, 6):
    checkpoint.save(mgr, step, {'step': np.int32(step),
                                'params': random_like(abstract, seed=step)}, meta)
  mgr.wait_until_finished()
  mgr.close()
  load = lambda s: teacher_file.load_step_params(directory, abstract, step=s)[0]
  seen = []
  rows = quick_fid.checkpoint_curve(q, directory, load, steps=[2, 6], batch_size=16,
                                    on_row=seen.append)
  assert [r['step'] for r in rows] == [2, 6] and [r['images_seen'] for r in rows] == [32, 96]
  assert seen == rows and all(r['time'] is not None for r in rows)
  assert rows[0]['fid_w0'] == q(load(2))['fid_w0']
  # Rows already scored are reused, not resampled.
  again = quick_fid.checkpoint_curve(q, directory, lambda s: pytest.fail('resampled'),
                                     steps=[2, 6], batch_size=16,
                                     previous={r['step']: r for r in rows})
  assert [r['fid_w1'] for r in again] == [r['fid_w1'] for r in rows]
  text = quick_fid.table(rows, q.w_values)
  assert 'fid_w0' in text.splitlines()[0] and len(text.splitlines()) == 3
  for r, m in zip(rows, (1.0, 3.0)):  # a top axis of minutes when they are known
    r['minutes'] = m
  path = quick_fid.plot_curve(rows, str(tmp_path / 'curve.png'), w_values=q.w_values,
                              floor={'fid': 0.5, 'num_samples': 24, 'split': 'test'},
                              title='test')
  assert os.path.getsize(path) > 1000


@pytest.mark.slow
def test_teacher_curve_script_on_a_fake_workdir(tmp_path, fashion_data_dir, capsys):
  """benchmarks/teacher_curve.py end to end on a smoke-config workdir whose teacher
  checkpoints hold random parameters, with a random (untrained) feature classifier."""
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from gdistill.eval import classifier  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import teacher_curve  # pylint: disable=g-import-not-at-top
  config = _config()
  config.data.data_dir = fashion_data_dir
  config.eval.update(num_samples=16, reference_examples=2000)
  config.checkpoint.max_to_keep = 5
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps(config.to_dict()))
  shape = (28, 28, 1)
  abstract = teacher_file.abstract_params_for(config, use_w=False, num_classes=K,
                                              image_shape=shape)
  mgr = checkpoint.manager(checkpoint.phase_dir(str(workdir), 'teacher'), max_to_keep=5)
  meta = dict(teacher_file.network_info(config, use_w=False, num_classes=K, image_shape=shape),
              phase='teacher', has_ema=False)
  for step in (2, 4, 6):
    checkpoint.save(mgr, step, {'step': np.int32(step),
                                'params': random_like(abstract, seed=step)}, meta)
  mgr.wait_until_finished()
  mgr.close()
  cls_path = str(tmp_path / 'classifier.npz')
  params = classifier.FeatureClassifier(num_classes=K).init(
      jax.random.PRNGKey(0), np.zeros((1, *shape), np.uint8))['params']
  classifier.save_classifier(cls_path, params, {'dataset': 'fashion_mnist',
                                                'image_shape': list(shape), 'num_classes': K,
                                                'test_accuracy': 0.1})
  argv = [f'--workdir={workdir}', '--num_samples=16', '--steps=2', '--every=2',
          '--batch_size=16', f'--classifier_path={cls_path}']
  out = teacher_curve.run(teacher_curve.parse_args(argv))
  assert [r['step'] for r in out['rows']] == [2, 6]
  assert all(math.isfinite(r['fid_w1']) for r in out['rows'])
  prefix = workdir / 'eval' / 'curve_teacher'
  assert json.loads(prefix.with_suffix('.json').read_text())['rows'] == out['rows']
  assert prefix.with_suffix('.png').stat().st_size > 1000
  assert 'fid_w0' in capsys.readouterr().out
  again = teacher_curve.run(teacher_curve.parse_args(argv))  # nothing new to score
  assert again['rows'] == out['rows']
