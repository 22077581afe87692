"""``python -m gdistill.sample``: argument errors are one line that says what
exists (checked on a workdir of meta-only checkpoints, in seconds), and real
sampling from every kind of model of the smoke workdir (slow)."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import smoke_workdir


def _sample(*args, timeout=300):
  return subprocess.run([sys.executable, '-m', 'gdistill.sample', *args], cwd=smoke_workdir.REPO,
                        env=smoke_workdir.subprocess_env(), capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture(scope='module')
def fake(tmp_path_factory):
  return smoke_workdir.fake_workdir(str(tmp_path_factory.mktemp('fake') / 'workdir'))


def _one_line_error(proc, fragment):
  assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-2000:]
  assert fragment in lines[0], lines[0]


@pytest.mark.parametrize('args, fragment', [
    (['--steps=3'],
     '--steps=3: workdir {w} has no 3-step student; distilled step counts for --sampler=ddim: '
     '2, 4 (or use --model=stage1 or --model=teacher'),
    (['--steps=6', '--sampler=stochastic'],
     'the stochastic sampler at N steps needs the N/2-step student; this workdir serves '
     '--sampler=stochastic at 4, 8 steps'),
    (['--steps=4', '--class=10'],
     '--class=10: expected a class of fashion_mnist in 0..9 (0 T-shirt/top, 1 Trouser'),
    (['--steps=4', '--class=-1'], '--class=-1: expected a class'),
    (['--steps=4', '--class=boots'], '--class=boots: expected a class'),
    (['--steps=0'], '--steps=0: expected a positive number'),
    (['--steps=4', '--num=0'], '--num=0: expected a positive number'),
    (['--steps=4', '--w=-1'], '--w=-1.0: expected a guidance weight >= 0'),
    (['--steps=4', '--sampler=ancestral'], 'flag --sampler=ancestral'),
])
def test_errors_are_one_line(fake, tmp_path, args, fragment):
  proc = _sample(f'--workdir={fake}', *args, f'--output={tmp_path}/o.png')
  _one_line_error(proc, fragment.format(w=fake))


def test_output_and_workdir_errors(fake, tmp_path):
  _one_line_error(_sample(f'--workdir={fake}', '--steps=4', f'--output={tmp_path}/o.jpg'),
                  '--output=')
  _one_line_error(_sample(f'--workdir={tmp_path}', '--steps=4', f'--output={tmp_path}/o.png'),
                  'no config.json there')
  _one_line_error(_sample('--steps=4', f'--output={tmp_path}/o.png'), '--workdir is required')


@pytest.mark.slow
def test_samples_from_every_model(fashion_data_dir, tmp_path):
  workdir = smoke_workdir.get(fashion_data_dir)
  runs = {
      'student.png': ['--steps=4', '--class=sneaker', '--num=3'],
      'stoch.npz': ['--steps=8', '--sampler=stochastic', '--num=2', '--w=2'],
      'stage1.npz': ['--steps=5', '--model=stage1', '--class=3', '--num=2'],
      'teacher.npz': ['--steps=3', '--model=teacher', '--class=0', '--num=2', '--w=0'],
  }
  for name, args in runs.items():
    proc = _sample(f'--workdir={workdir}', *args, f'--output={tmp_path / name}')
    assert proc.returncode == 0, proc.stderr[-3000:]
  with Image.open(tmp_path / 'student.png') as im:
    assert im.size == (2 * (3 * 30 + 2), 2 * (1 * 30 + 2))  # one row of 3 (padding 2, x2)
  with np.load(tmp_path / 'stoch.npz') as d:
    assert d['image'].shape == (20, 28, 28, 1) and d['image'].dtype == np.uint8
    assert list(d['label']) == [c for c in range(10) for _ in range(2)]
    assert str(d['model']) == 'stage2_n0004' and int(d['nfe_per_sample']) == 8
  with np.load(tmp_path / 'stage1.npz') as d:
    assert list(d['label']) == [3, 3] and str(d['model']) == 'stage1'
  with np.load(tmp_path / 'teacher.npz') as d:
    assert str(d['model']) == 'teacher' and int(d['nfe_per_sample']) == 6
  # The same seed gives the same samples.
  again = tmp_path / 'again.npz'
  assert _sample(f'--workdir={workdir}', *runs['stoch.npz'], f'--output={again}').returncode == 0
  with np.load(again) as a, np.load(tmp_path / 'stoch.npz') as b:
    np.testing.assert_array_equal(a['image'], b['image'])


def test_sample_from_the_shipped_teacher_file_without_a_workdir(tmp_path):
  """Right after install: the one-file teacher samples real images of the asked class."""
  out = str(tmp_path / 'sneakers.npz')
  proc = subprocess.run(
      [sys.executable, '-m', 'gdistill.sample',
       '--model=gdistill/weights/fashion_mnist_teacher.msgpack', '--steps=8', '--w=1',
       '--class=sneaker', '--num=4', f'--output={out}'],
      cwd=str(tmp_path), env=smoke_workdir.subprocess_env(), capture_output=True, text=True,
      timeout=300)  # from another directory: the shipped path resolves to the package's file
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'samples from teacher' in proc.stdout
  data = np.load(out)
  assert data['image'].shape == (4, 28, 28, 1) and set(data['label'].tolist()) == {7}
  assert data['image'].std() > 20  # images, not a flat field


@pytest.mark.parametrize('model, fragment', [
    ('foo', '--model=foo: expected student, stage1, teacher or a one-file model'),
    ('nope.msgpack', 'nope.msgpack: no such file'),
])
def test_sample_from_a_bad_model_file_is_one_line(model, fragment, tmp_path):
  _one_line_error(_sample(f'--model={model}', '--steps=2', f'--output={tmp_path}/x.png'),
                  fragment)
