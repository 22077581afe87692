"""A workdir written by gdistill before the run plan (main at commit ``OLD_COMMIT``)
resumes, samples and evaluates with today's code (slow: two smoke runs)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import smoke_workdir
from gd_testlib import unpack_commit

OLD_COMMIT = 'dbe78ec'  # main before gdistill.run_plan and gdistill.model_store
REPO = smoke_workdir.REPO


def _gdistill(module, *args, cwd=REPO, pythonpath=REPO, timeout=900):
  env = smoke_workdir.subprocess_env()
  env['PYTHONPATH'] = pythonpath
  return subprocess.run([sys.executable, '-m', f'gdistill.{module}', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def old_workdir(tmp_path_factory, fashion_data_dir):
  """Teacher and stage 1 of the smoke config, trained by the code at OLD_COMMIT."""
  base = tmp_path_factory.mktemp('old')
  src = unpack_commit(OLD_COMMIT, str(base / 'src'), 'gdistill', 'configs')
  workdir = str(base / 'workdir')
  proc = _gdistill('main', '--config=configs/smoke.py', f'--workdir={workdir}',
                   "--config.stages=('teacher','stage1')",
                   f'--config.data.data_dir={fashion_data_dir}', cwd=src, pythonpath=src)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir


@pytest.mark.slow
def test_old_workdir_resumes_samples_and_evaluates(old_workdir, fashion_data_dir, tmp_path):
  workdir = str(tmp_path / 'workdir')
  shutil.copytree(old_workdir, workdir)
  data = f'--config.data.data_dir={fashion_data_dir}'
  # The same command as before, now with stage 2: the finished phases load, stage 2 trains.
  proc = _gdistill('main', '--config=configs/smoke.py', f'--workdir={workdir}',
                   "--config.stages=('teacher','stage1','stage2')", data)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = proc.stdout + proc.stderr
  assert 'teacher: already finished' in out and 'stage1: already finished' in out
  for phase in ('stage2_n0004', 'stage2_n0002'):
    assert os.path.isdir(os.path.join(workdir, 'checkpoints', phase)), phase

  out = str(tmp_path / 'stoch.npz')
  proc = _gdistill('sample', f'--workdir={workdir}', '--steps=8', '--sampler=stochastic',
                   '--num=2', f'--output={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out) as d:
    assert str(d['model']) == 'stage2_n0004' and d['image'].shape == (20, 28, 28, 1)

  proc = _gdistill('evaluate', f'--workdir={workdir}', '--config.eval.num_samples=20',
                   '--config.eval.batch_size=20', "--config.eval.w_values=(1.0,)",
                   "--config.eval.teacher_steps=(2,)", "--config.eval.teacher_ddim_steps=(1,)",
                   '--config.eval.classifier_steps=10', '--config.eval.reference_examples=500')
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, 'eval', 'report.json')) as f:
    rows = json.load(f)['rows']
  phases = {r['checkpoint'].split('@')[0] for r in rows}
  assert phases == {'teacher', 'stage2_n0004', 'stage2_n0002'}, phases
