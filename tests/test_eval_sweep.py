"""The evaluation sweep: its plan, scoring, report, plots and commands.

Fast tests check the pieces on synthetic data (seconds). The slow test runs the
smoke pipeline with its ``eval`` stage, then extends the sweep with
``python -m gdistill.evaluate`` and checks that finished rows are reused.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

import smoke_workdir
from gdistill import run_plan
from gdistill.config_validation import ConfigError, validate_eval
from gdistill.eval import features, plan, plots, report, sweep
from gdistill.eval.workdir_config import get_config as workdir_config

REPO = smoke_workdir.REPO


def _config(name='smoke'):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# ---- the plan ---------------------------------------------------------------------------


def test_plan_counts_nfe_and_serves_stochastic_rows_from_the_half_step_student():
  settings = plan.build_plan(
      w_values=(0.0, 1.0), models=plan.MODELS, teacher_steps=(64, 256),
      teacher_ddim_steps=(1, 2, 64),
      students=[p for p in run_plan.build(stage2_start=8, stage2_min=1).of_kind('stage2')
                if p.student_steps in (1, 4)],
      samplers=('ddim', 'stochastic'))
  rows = {(s.model, s.sampler, s.steps): s for s in settings if s.w == 0.0}
  assert set(rows) == {('student', 'ddim', 1), ('student', 'stochastic', 2),
                       ('student', 'ddim', 4), ('student', 'stochastic', 8),
                       ('teacher_ddim', 'ddim', 1), ('teacher_ddim', 'ddim', 2),
                       ('teacher', 'ddim', 64), ('teacher', 'ddim', 256)}
  assert rows[('student', 'stochastic', 8)].phase == 'stage2_n0004'
  assert rows[('student', 'stochastic', 2)].phase == 'stage2_n0001'
  assert rows[('student', 'stochastic', 8)].nfe == 8
  assert rows[('teacher_ddim', 'ddim', 2)].nfe == 4
  assert rows[('teacher', 'ddim', 256)].nfe == 512
  assert rows[('teacher', 'ddim', 256)].mode == 'guided'
  assert rows[('student', 'ddim', 4)].mode == 'student'
  assert len(settings) == 2 * len(rows)
  assert settings[-1].model == 'teacher'  # the expensive rows come last


def test_plan_runs_expensive_rows_at_fewer_w_and_selects_students():
  c = _config('fashion_mnist')
  # The students the sweep plans for (sweep.evaluate: every distilled phase of the plan).
  settings = plan.plan_from_config(c.eval, run_plan.from_config(c).distilled())
  assert all(s.w in (0.0, 1.0) for s in settings if s.nfe > c.eval.expensive_nfe)
  assert {s.w for s in settings if s.nfe <= c.eval.expensive_nfe} == set(c.eval.w_values)
  assert 'stage2_n0016' not in {s.phase for s in settings}
  assert {s.steps for s in settings if s.model == 'teacher'} == {64}
  # The DDIM grid's students give DDIM rows only; the stochastic sampler's rows are its
  # own students', at 8 and 4 steps.
  stochastic = {(s.phase, s.steps) for s in settings if s.sampler == 'stochastic'}
  assert stochastic == {('stage2s_n0004', 8), ('stage2s_n0002', 4)}
  assert all(s.sampler == 'ddim' for s in settings if s.phase.startswith('stage2_n'))
  # The sizing the config's comment quotes (the teacher's rows ship measured).
  assert sum(s.nfe for s in settings if s.model == 'student') * c.eval.num_samples == 81_000


@pytest.mark.parametrize('key, value, fragment', [
    ('num_samples', 5, 'eval.num_samples=5: expected at least 10'),
    ('batch_size', 3, 'eval.batch_size=3: expected a multiple of the number of devices (2)'),
    ('w_values', (0.0, -1.0), 'eval.w_values=(0.0, -1.0)'),
    ('models', ('teacher', 'gan'), "eval.models=('teacher', 'gan'): expected a non-empty subset"),
    ('samplers', ('ancestral',), "eval.samplers=('ancestral',)"),
    ('teacher_steps', (0,), 'eval.teacher_steps=(0,)'),
    ('feature_net', 'vgg', "eval.feature_net='vgg': expected one of"),
    ('floor_split', None, 'eval.floor_split=None'),
])
def test_eval_config_errors_name_the_key(key, value, fragment):
  c = _config()
  c.eval[key] = value
  with pytest.raises(ConfigError, match=re.escape(fragment)):
    validate_eval(c, num_devices=2)


def test_inception_needs_a_weights_path():
  c = _config()
  c.data.name = 'cifar10'
  with pytest.raises(ConfigError, match=re.escape("eval.inception_weights='': expected the path")):
    validate_eval(c)
  assert plan.feature_net_kind('auto', 'mnist') == 'classifier'
  assert plan.feature_net_kind('auto', 'imagenet_resized/64x64') == 'inception'


def test_missing_inception_file_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match='eval.inception_weights=.*not found'):
    features.inception_net(weights=str(tmp_path / 'nope.npz'))


# ---- scoring -------------------------------------------------------------------------


class _ArraySource:
  """An ImageSource stand-in over in-memory arrays."""

  def __init__(self, images, name='synthetic', split='train'):
    self.images, self.name, self.split = images, name, split
    self.num_examples = len(images)
    self.calls = 0

  def get(self, indices):
    self.calls += 1
    return {'image': self.images[np.asarray(indices)], 'label': np.zeros(len(indices), np.int32)}


def _pixel_net():
  """Features = the pixels of a 4x4x1 uint8 image in [-1, 1]; 2 fake logits."""
  def fn(images):
    f = images.reshape(len(images), -1).astype(np.float32) / 127.5 - 1.0
    return f, np.stack([f.mean(1), -f.mean(1)], 1)
  return features.FeatureNet('pixels', fn, {'name': 'pixels'}, 'pixels-v1')


def _images(rng, n, shift=0.0):
  x = np.clip(0.3 * rng.standard_normal((n, 4, 4, 1)) + shift, -1, 1)
  return x.astype(np.float32)


def test_fid_is_zero_for_identical_sets_and_grows_with_a_known_shift(tmp_path):
  rng = np.random.default_rng(0)
  real = _images(rng, 4000)
  net = _pixel_net()
  from gdistill.eval import metrics  # pylint: disable=g-import-not-at-top
  source = _ArraySource(metrics.quantize_uint8(real))
  ref = features.split_statistics(net, source, cache_path=str(tmp_path / 'ref.npz'),
                                  subset_size=500)
  same = sweep.score(real, net, ref, k=3)
  assert abs(same['fid']) < 1e-6
  fids = [sweep.score(real + s, net, ref, k=3)['fid'] for s in (0.05, 0.1, 0.2)]
  # Equal covariances: FID = ||mu_1 - mu_2||^2 = d * shift^2 (d = 16 pixels), up to the
  # uint8 quantisation and the clipping at +-1.
  np.testing.assert_allclose(fids, [16 * s**2 for s in (0.05, 0.1, 0.2)], rtol=0.15)
  assert fids[0] < fids[1] < fids[2]


def test_split_statistics_stream_equals_feature_statistics_and_is_cached(tmp_path):
  rng = np.random.default_rng(1)
  from gdistill.eval import metrics  # pylint: disable=g-import-not-at-top
  images = metrics.quantize_uint8(_images(rng, 25_000))  # > one chunk of 10k
  net, source = _pixel_net(), _ArraySource(images)
  path = str(tmp_path / 'stats.npz')
  stats = features.split_statistics(net, source, cache_path=path, subset_size=50, seed=3)
  mu, sigma = metrics.feature_statistics(net.fn(images)[0])
  np.testing.assert_allclose(stats['mu'], mu, atol=1e-9)
  np.testing.assert_allclose(stats['sigma'], sigma, atol=1e-9)
  assert stats['n'] == 25_000 and stats['subset_features'].shape == (50, 16)
  calls = source.calls
  again = features.split_statistics(net, source, cache_path=path, subset_size=50, seed=3)
  assert source.calls == calls  # read from the cache
  np.testing.assert_array_equal(again['subset_features'], stats['subset_features'])
  capped = features.split_statistics(net, source, cache_path=path, subset_size=50, seed=3,
                                     max_examples=1000)
  assert capped['n'] == 1000 and source.calls > calls  # another fingerprint: recomputed


def _toy_apply(variables, z, logsnr, label, *, train=False, rngs=None, w=None):
  """A stand-in network (v output) that depends on every input and compiles in a blink."""
  del train, rngs
  p = variables['params']
  extra = 0.0 if w is None else w[:, None, None, None] * p['w']
  return p['a'] * z + 0.01 * (logsnr + label)[:, None, None, None] + extra


def test_generate_reuses_one_compilation_and_feeds_w_and_steps():
  from gdistill import compiled_samplers  # pylint: disable=g-import-not-at-top
  params = {'a': jnp.float32(0.5), 'w': jnp.float32(0.3)}
  from gdistill.denoiser import from_apply  # pylint: disable=g-import-not-at-top
  fn = compiled_samplers.make_sample_fn(from_apply(_toy_apply, mean_type='v', num_classes=10),
                                        mode='student', sampler='stochastic')
  kw = dict(num_samples=10, batch_size=6, num_classes=10, image_shape=(4, 4, 1), seed=0)
  a, seconds, sampled = sweep.generate(fn, params, w=0.0, num_steps=2, **kw)
  assert a.shape == (10, 4, 4, 1) and sampled == 12 and seconds > 0
  b, _, _ = sweep.generate(fn, params, w=3.0, num_steps=2, **kw)
  c4, _, _ = sweep.generate(fn, params, w=0.0, num_steps=4, **kw)
  again, _, _ = sweep.generate(fn, params, w=0.0, num_steps=2, **kw)
  np.testing.assert_array_equal(a, again)  # inputs are a function of (seed, batch)
  assert np.abs(a - b).max() > 1e-4 and np.abs(a - c4).max() > 1e-4
  assert fn._cache_size() == 1  # pylint: disable=protected-access
  label, z_1, _ = sweep.batch_inputs(1, batch_size=6, num_classes=10, image_shape=(2, 2, 1),
                                     seed=0)
  np.testing.assert_array_equal(label, [6, 7, 8, 9, 0, 1])
  assert z_1.shape == (6, 2, 2, 1)


# ---- report and plots ------------------------------------------------------------------


def _row(model, steps, sampler, w, fid, **kw):
  nfe = steps * (1 if model == 'student' else 2)
  return dict(model=model, steps=steps, nfe=nfe, sampler=sampler, w=w, fid=fid,
              precision=0.7, recall=0.5, num_samples=100, seconds_per_image=1e-3,
              checkpoint='x@1', weights='raw', **{'is': 2.0 + w}, **kw)


def _rows():
  rows = []
  for w in (0.0, 1.0):
    rows += [_row('teacher', 64, 'ddim', w, 10.0), _row('teacher_ddim', 4, 'ddim', w, 40.0),
             _row('teacher_ddim', 1, 'ddim', w, 200.0),
             _row('student', 8, 'ddim', w, 10.5), _row('student', 8, 'stochastic', w, 12.0),
             _row('student', 4, 'ddim', w, 13.0), _row('student', 2, 'ddim', w, 250.0),
             _row('student', 1, 'ddim', w, float('nan'))]
  return rows


def test_claims_compare_students_with_the_teacher_and_its_ddim():
  claims = report.claims(_rows())
  at0 = [c for c in claims if c['w'] == 0.0]
  by_claim = {(c['claim'].split(' ')[0], c['student']): c for c in at0 if 'FID within' in c['claim']}
  eight = by_claim[('8-step', 'ddim 8 steps')]
  assert eight['passed'] and eight['reference'] == 10.0 and eight['target'] == pytest.approx(11.0)
  four = by_claim[('4-step', 'ddim 4 steps')]
  assert not four['passed'] and four['target'] == pytest.approx(12.5)  # 13 > 10 * 1.25
  nfe = {c['student']: c for c in at0 if c['claim'].startswith('student beats')}
  assert nfe['ddim 8 steps']['reference'] == 40.0 and nfe['ddim 8 steps']['passed']
  assert not nfe['ddim 2 steps']['passed']  # 250 vs the teacher's 1-step DDIM 200
  assert 'ddim 1 step' not in nfe  # NaN FID: no claim either way
  assert not any('floor' in c['claim'] for c in claims)  # no floor given


def test_claims_check_the_teacher_against_the_floor_and_precision_recall():
  rows = _rows()
  rows[3] = dict(_row('student', 8, 'ddim', 0.0, 10.5), precision=0.76, recall=0.52)
  floor = {'fid': 3.0, 'num_samples': 100}
  claims = [c for c in report.claims(rows, floor) if c['w'] == 0.0]
  teacher = next(c for c in claims if 'floor' in c['claim'])
  assert not teacher['passed'] and teacher['target'] == pytest.approx(9.0)  # 10 > 3 x 3
  assert next(c for c in report.claims(rows, {'fid': 4.0, 'num_samples': 100})
              if 'floor' in c['claim'])['passed']
  assert not any('floor' in c['claim'] for c in report.claims(rows, {'fid': 3.0,
                                                                     'num_samples': 50}))
  # Only at w = 0: guidance raises FID against real data by design.
  assert {c['w'] for c in report.claims(rows, floor) if 'floor' in c['claim']} == {0.0}
  pr = {c['claim'].split(' ')[0] + ' ' + c['claim'].split(' ')[2]: c for c in claims
        if 'within 0.05' in c['claim']}
  assert not pr['8-step precision']['passed']  # 0.76 vs the teacher's 0.70
  assert pr['8-step recall']['passed'] and pr['4-step precision']['passed']


def test_report_files_and_plots(tmp_path):
  rows = _rows()
  floor = dict(split='test', fid=1.0, fid_full=0.2, num_samples=100, num_full=10000, **{
      'is': 9.0}, is_std=0.1, precision=0.8, recall=0.8)
  proto = {'dataset': 'synthetic', 'feature_network': {'description': 'pixels', 'path': '-'},
           'note': report.NOT_COMPARABLE, 'reference_split': 'train', 'reference_examples': 9,
           'num_samples': 100, 'batch_size': 50, 'seed': 0, 'labels': 'i mod K',
           'is_splits': 10, 'precision_recall_k': 3, 'precision_recall_real': '100 images',
           'weights': {'teacher': 'ema'}, 'checkpoints': {'teacher': 5}, 'nfe': '2 / 1',
           'stochastic_sampler': 'N/2', 'seconds_per_image': 'wall', 'missing_students': []}
  rep = report.write(str(tmp_path), protocol=proto, floor=floor, rows=rows)
  with open(tmp_path / 'report.json') as f:
    loaded = json.load(f)
  assert set(loaded) == {'protocol', 'floor', 'claims', 'rows'}
  assert len(loaded['rows']) == len(rows) and loaded == rep
  nan_row = [r for r in loaded['rows'] if r['model'] == 'student' and r['steps'] == 1]
  assert nan_row[0]['fid'] is None  # NaN -> null, valid JSON
  md = (tmp_path / 'report.md').read_text()
  assert '## w = 0' in md and '## w = 1' in md and 'not comparable to Inception' in md
  assert '| student | stochastic | 8 | 8 | 12.000 |' in md
  paths = plots.write_all(str(tmp_path), rep)
  assert [os.path.basename(p) for p in paths] == ['fid_vs_nfe.png', 'fid_vs_is.png',
                                                   'pr_vs_w.png']
  assert all(os.path.getsize(p) > 10_000 for p in paths)
  # Only rows of the same protocol are reused.
  fp = rep['protocol'].get('fingerprint')
  assert report.reusable_rows(str(tmp_path / 'report.json'), 'other') == []
  assert len(report.reusable_rows(str(tmp_path / 'report.json'), fp)) == len(rows)


def test_workdir_config_restores_the_recorded_config(tmp_path):
  from gdistill.workdir import check_and_record_config  # pylint: disable=g-import-not-at-top
  c = _config()
  check_and_record_config(c, str(tmp_path))
  restored = workdir_config(str(tmp_path))
  assert restored.to_dict() == c.to_dict()
  # A run recorded before the eval section existed gets the default section.
  recorded = json.loads((tmp_path / 'config.json').read_text())
  del recorded['eval']
  (tmp_path / 'config.json').write_text(json.dumps(recorded))
  assert workdir_config(str(tmp_path)).eval.num_samples == 1000


# ---- the commands ------------------------------------------------------------------------


def _evaluate(*args, timeout=120):
  return subprocess.run([sys.executable, '-m', 'gdistill.evaluate', *args], cwd=REPO,
                        env=smoke_workdir.subprocess_env(), capture_output=True, text=True,
                        timeout=timeout)


def _one_line_error(proc, fragment):
  assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-2000:]
  assert fragment in lines[0], lines[0]


def test_evaluate_command_errors_are_one_line(tmp_path):
  _one_line_error(_evaluate(), '--workdir is required')
  _one_line_error(_evaluate(f'--workdir={tmp_path}'), 'no config.json there')
  fake = smoke_workdir.fake_workdir(str(tmp_path / 'fake'))
  _one_line_error(_evaluate(f'--workdir={fake}', '--config.eval.feature_net=vgg'),
                  "eval.feature_net='vgg': expected one of")


@pytest.mark.slow
def test_smoke_pipeline_eval_stage_then_extend_with_the_evaluate_command(tmp_path,
                                                                        fashion_data_dir):
  workdir = str(tmp_path / 'workdir')
  shutil.copytree(smoke_workdir.get(fashion_data_dir), workdir)
  shutil.rmtree(os.path.join(workdir, 'eval'), ignore_errors=True)
  t0 = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, '-m', 'gdistill.main', '--config=configs/smoke.py', f'--workdir={workdir}',
       "--config.stages=('teacher','stage1','stage2','eval')",
       f'--config.data.data_dir={fashion_data_dir}'],
      cwd=REPO, env=smoke_workdir.subprocess_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  wall = time.perf_counter() - t0
  eval_time = re.search(r'eval: wrote .*report\.md \((\d+) rows\) in (\d+)m(\d+)s', proc.stdout)
  assert eval_time, proc.stdout[-3000:]
  minutes, seconds = int(eval_time.group(2)), int(eval_time.group(3))
  print(f'smoke eval stage: {60 * minutes + seconds}s (pipeline command {wall:.0f}s)')

  out = os.path.join(workdir, 'eval')
  with open(os.path.join(out, 'report.json')) as f:
    rep = json.load(f)
  c = _config()
  # Students 4 and 2 (ddim at 4, 2; stochastic at 8, 4), teacher DDIM at 1, 2, teacher at 8.
  assert len(rep['rows']) == 7 * len(c.eval.w_values)
  keys = {'model', 'steps', 'nfe', 'sampler', 'w', 'fid', 'is', 'precision', 'recall',
          'num_samples', 'seconds_per_image'}
  for row in rep['rows']:
    assert keys <= set(row), row
    assert row['num_samples'] == c.eval.num_samples and row['seconds_per_image'] > 0
    assert row['fid'] is not None and row['fid'] > 0
  assert {(r['model'], r['sampler'], r['steps'], r['nfe']) for r in rep['rows']} == {
      ('student', 'ddim', 2, 2), ('student', 'ddim', 4, 4), ('student', 'stochastic', 4, 4),
      ('student', 'stochastic', 8, 8), ('teacher_ddim', 'ddim', 1, 2),
      ('teacher_ddim', 'ddim', 2, 4), ('teacher', 'ddim', 8, 16)}
  p = rep['protocol']
  assert p['feature_network']['name'] == 'classifier'
  assert 0 < p['feature_network']['test_accuracy'] <= 1
  assert p['reference_split'] == 'train' and p['num_samples'] == 40
  assert p['weights'] == {'teacher': 'ema', 'stage2_n0004': 'raw', 'stage2_n0002': 'raw'}
  assert rep['floor']['split'] == 'test' and rep['floor']['fid'] >= 0
  for name in ('report.md', 'fid_vs_nfe.png', 'fid_vs_is.png', 'pr_vs_w.png', 'classifier.npz',
               'samples/student-stochastic-steps008-w1.png',
               'samples/teacher-ddim-steps008-w0.png'):
    assert os.path.isfile(os.path.join(out, name)), name

  # Extending the sweep samples only the new rows (config from the workdir's config.json).
  proc = _evaluate(f'--workdir={workdir}', f'--config.data.data_dir={fashion_data_dir}',
                   "--config.eval.w_values=(0.0, 1.0, 2.0)", timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert '21 settings, 14 already in the report, 7 to sample' in proc.stdout, proc.stdout[-3000:]
  with open(os.path.join(out, 'report.json')) as f:
    extended = json.load(f)
  assert len(extended['rows']) == 21
  old = {(r['model'], r['sampler'], r['steps'], r['w']): r['fid'] for r in rep['rows']}
  for r in extended['rows']:
    if (r['model'], r['sampler'], r['steps'], r['w']) in old:
      assert r['fid'] == old[(r['model'], r['sampler'], r['steps'], r['w'])]

  # The demo's exporter ships a finished run's students with their report rows.
  from gdistill import demo  # pylint: disable=g-import-not-at-top
  infos = demo.ship(workdir, weights_dir=str(tmp_path / 'weights'), steps=(4, 2))
  for n, info in zip((4, 2), infos):
    assert info['phase'] == f'stage2_n{n:04d}' and info['weights']['dtype'] == 'float16'
    assert info['report_rows'] and all(r['steps'] == n for r in info['report_rows'])
    assert os.path.isfile(demo.student_file(n, str(tmp_path / 'weights')))
  assert os.path.isfile(tmp_path / 'weights' / 'fashion_mnist_report.json')


def test_shipped_teacher_rows_fit_the_shipped_teacher_and_classifier():
  """The rows shipped with the embedded default's teacher were measured for that very file
  (sha256) in the features of the shipped classifier; re-exporting either without
  re-measuring the rows would make the sweep silently sample them (or worse)."""
  from gdistill.eval import classifier as classifier_lib, features, teacher_rows
  weights = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'gdistill', 'weights')
  with open(os.path.join(weights, 'fashion_mnist_teacher_rows.json')) as f:
    shipped = json.load(f)
  teacher = os.path.join(weights, 'fashion_mnist_teacher.msgpack')
  assert shipped['teacher_sha256'] == teacher_rows.teacher_sha256(teacher)
  params, _ = classifier_lib.load_classifier(os.path.join(weights,
                                                          'fashion_mnist_classifier.npz'))
  net_fp = f'classifier-{features._digest_tree(params)}'  # pylint: disable=protected-access
  assert report.fingerprint(shipped['protocol'], net_fp) == shipped['fingerprint']
  rows = teacher_rows.load_matching(os.path.join(weights, 'fashion_mnist_teacher_rows.json'),
                                    fingerprint=shipped['fingerprint'],
                                    sha256=shipped['teacher_sha256'])
  assert {(r['model'], r['steps'], r['w']) for r in rows} >= {('teacher', 64, 0.0),
                                                              ('teacher', 64, 1.0)}
  assert all(r['source'].startswith('fashion_mnist_teacher_rows.json') for r in rows)
  for wrong in (dict(fingerprint='0' * 16, sha256=shipped['teacher_sha256']),
                dict(fingerprint=shipped['fingerprint'], sha256='0' * 64)):
    assert teacher_rows.load_matching(
        os.path.join(weights, 'fashion_mnist_teacher_rows.json'), **wrong) == []


def test_teacher_rows_export_takes_only_sampled_teacher_rows(tmp_path):
  from gdistill.eval import teacher_rows
  rows = _rows() + [dict(_row('teacher', 8, 'ddim', 4.0, 1.0), source='elsewhere')]
  rep = {'protocol': {'fingerprint': 'abc'}, 'rows': rows}
  path = tmp_path / 'report.json'
  path.write_text(json.dumps(rep))
  weights = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'gdistill', 'weights')
  out = tmp_path / 'rows.json'
  data = teacher_rows.export(str(path), os.path.join(weights, 'fashion_mnist_teacher.msgpack'),
                             str(out))
  assert {r['model'] for r in data['rows']} == {'teacher', 'teacher_ddim'}
  assert not any(r.get('source') for r in data['rows'])  # reused rows are not re-exported
  assert json.loads(out.read_text())['fingerprint'] == 'abc'


def test_teacher_clip_is_in_the_protocol_and_changes_the_fingerprint_only_when_set():
  base = {'dataset': 'd', 'reference_split': 'train', 'reference_examples': 10,
          'num_samples': 10, 'batch_size': 5, 'seed': 0, 'precision_recall_k': 3}
  before = report.fingerprint(base, 'f')  # a protocol of an earlier gdistill
  assert report.fingerprint(dict(base, teacher_clip='guided'), 'f') == before
  assert report.fingerprint(dict(base, teacher_clip='branches'), 'f') != before
  c = _config()
  c.guidance.teacher_clip = 'branches'
  p = report.make_protocol(config=c, num_classes=10, image_shape=(8, 8, 1),
                           feature_net={'description': 'x', 'path': 'y'}, reference_examples=10,
                           checkpoints={}, missing=[], num_devices=1)
  assert p['teacher_clip'] == 'branches' and "the authors' way" in p['teacher_sampling']
