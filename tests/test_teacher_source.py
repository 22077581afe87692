"""``teacher.source``: a teacher from another codebase, through the stock pipeline, and the
one-line errors a user meets."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

import smoke_workdir
from gdistill import teacher_source


def _config(**teacher):
  return ml_collections.ConfigDict({'teacher': dict(dict(allow_signal_at_t1=False), **teacher)})


def test_a_factory_teacher_loads_and_its_student_starts_as_the_teacher():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gd_testlib import perturb_params  # pylint: disable=g-import-not-at-top
  t = teacher_source.load('python:foreign_factory:make', _config(), image_shape=(28, 28, 1),
                          num_classes=10)
  assert t.embedding_dim() == 16
  params = perturb_params(t.params, seed=1)
  student = t.init_student(jax.random.PRNGKey(0), params)
  z = jax.random.normal(jax.random.PRNGKey(1), (3, 28, 28, 1))
  tt = jnp.asarray([0.1, 0.5, 1.0])
  lam, label = t.net.path.logsnr(tt), jnp.asarray([0, 4, 9])
  want = t.net.x_hat(params, z, t=tt, logsnr=lam, cond=label)
  got = t.student_net().x_hat(student, z, t=tt, logsnr=lam, cond=label, w=jnp.full((3,), 2.0))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('source,message', [
    ('python:no_such_module:make', r'cannot import no_such_module'),
    ('python:foreign_factory:nope', r'foreign_factory has no function .nope.'),
    ('python:foreign_factory:make_not_a_teacher', r'returned dict, expected .*ForeignTeacher'),
    ('python:foreign_factory:make_wrong_shape', r'returns shape \(2, 14, 28, 1\) for inputs \(2, 28, 28, 1\)'),
    ('python:foreign_factory:make_bad_null', r'rejects its null condition \[0, 0, 0\]'),
    ('python:foreign_factory:make_sd_like', r'alpha\(1\) = 0.068, far from pure noise'),
])
def test_a_bad_source_is_one_line_naming_it(source, message):
  with pytest.raises(teacher_source.TeacherSourceError, match=message) as e:
    teacher_source.load(source, _config())
  assert str(e.value).startswith(f'teacher.source={source!r}: ') and '\n' not in str(e.value)


def test_sd_like_path_loads_when_allowed():
  teacher_source.load('python:foreign_factory:make_sd_like', _config(allow_signal_at_t1=True))


def _main(workdir, *args, data_dir=''):
  env = smoke_workdir.subprocess_env()
  env['PYTHONPATH'] = os.pathsep.join([os.path.dirname(__file__), env['PYTHONPATH']])
  return subprocess.run(
      [sys.executable, '-m', 'gdistill.main', '--config=configs/smoke.py',
       f'--workdir={workdir}', '--config.teacher.source=python:foreign_factory:make',
       f'--config.data.data_dir={data_dir}', *args],
      cwd=smoke_workdir.REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # 60 s: CI time; the example run measures this path at full size
def test_the_stock_pipeline_distils_a_foreign_teacher(tmp_path, fashion_data_dir):
  """Stage 1 and the halvings 8 -> 2 steps of a foreign (NCHW, integer-time, eps, null 0)
  teacher; the rerun finds every phase finished."""
  workdir = str(tmp_path / 'run')
  stages = "--config.stages=('teacher','stage1','stage2')"
  proc = _main(workdir, stages, data_dir=fashion_data_dir)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  meta_file = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(workdir, 'checkpoints',
                                                                      'stage2_n0002'))
               for f in fs if f == 'metadata' and 'meta' in r]
  assert meta_file, os.listdir(os.path.join(workdir, 'checkpoints'))
  with open(meta_file[0]) as f:
    meta = json.load(f)
  assert meta['model']['source'] == 'python:foreign_factory:make'
  assert meta['model']['path']['kind'] == 'ddpm' and meta['mean_type'] == 'eps'
  assert os.path.isfile(os.path.join(workdir, 'samples', 'stage2_n0002_steps2_w2.png'))
  again = _main(workdir, stages, data_dir=fashion_data_dir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'stage2_n0002: already finished' in again.stdout + again.stderr


def test_a_start_the_table_cannot_nest_is_refused_before_anything_is_written(
    tmp_path, fashion_data_dir):
  workdir = str(tmp_path / 'run')
  proc = _main(workdir, "--config.stages=('stage1',)", '--config.stage2.start_steps=2048',
               data_dir=fashion_data_dir)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'stage2.start_steps=2048: the teacher\'s table has 1000 timesteps' in proc.stderr
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))


def test_an_encoder_start_the_table_cannot_nest_is_refused(tmp_path, fashion_data_dir):
  workdir = str(tmp_path / 'run')
  proc = _main(workdir, "--config.stages=('stage1','translate')",
               '--config.translate.encoder_start_steps=1024', data_dir=fashion_data_dir)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'translate.encoder_start_steps=1024: the teacher\'s table has 1000' in proc.stderr
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))
