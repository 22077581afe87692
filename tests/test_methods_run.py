"""One smoke-config run of both distillation methods beside each other, as a user runs it.

Teacher, stage 1, DDIM-only halvings 8 -> 4 -> 2, the stochastic sampler's own students at
8 and 4 steps (``stage2.stochastic``) and a consistency phase, then the sweep over the
distilled rows of both methods. The stochastic students train after the halvings and report
as model ``student``, sampler ``stochastic``; ``gdistill.sample --sampler=stochastic``
samples with them; the consistency phase writes its rows, grids and training cost. (One run
for both: each method's own run cost the suite three minutes of a worker. Slow: it repeats
the smoke pipeline of tests/test_pipeline.py with two more phases and the sweep, three
minutes of CI; the methods' losses, targets, plans and report are fast tests.)
"""

import json
import os
import subprocess
import sys

import pytest

import smoke_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TIMEOUT_S = 3600
STAGES = "('teacher','stage1','stage2','consistency','eval')"

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, fashion_data_dir):
  path = str(tmp_path_factory.mktemp('methods') / 'run')
  cmd = [sys.executable, '-m', 'gdistill.main', '--config=configs/smoke.py',
         f'--workdir={path}', f'--config.stages={STAGES}',
         f'--config.data.data_dir={fashion_data_dir}', '--config.stage2.time_grid=deterministic',
         '--config.stage2.stochastic.sampler_steps=(8, 4)',
         '--config.stage2.stochastic.num_steps=2', '--config.stage2.stochastic.batch_size=16',
         '--config.stage2.stochastic.checkpoint_every=2',
         "--config.eval.models=('student', 'consistency')",
         "--config.eval.samplers=('ddim', 'stochastic')"]
  proc = subprocess.run(cmd, cwd=REPO, env=smoke_workdir.subprocess_env(), capture_output=True,
                        text=True, timeout=RUN_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return path


def _report_rows(workdir, model):
  rep = json.loads(open(os.path.join(workdir, 'eval', 'report.json')).read())
  return [r for r in rep['rows'] if r['model'] == model]


def test_stochastic_students_train_after_the_halvings_and_report_their_rows(workdir):
  done = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  assert done == ['consistency', 'stage1', 'stage2_n0002', 'stage2_n0004', 'stage2s_n0002',
                  'stage2s_n0004', 'teacher'], done
  rows = {(r['sampler'], r['steps'], r['w']): r for r in _report_rows(workdir, 'student')}
  assert set(rows) == {(s, n, w) for s, ns in (('ddim', (2, 4)), ('stochastic', (4, 8)))
                       for n in ns for w in (0.0, 1.0)}, sorted(rows)
  assert rows[('stochastic', 8, 0.0)]['checkpoint'].startswith('stage2s_n0004@')
  assert rows[('stochastic', 4, 1.0)]['nfe'] == 4
  assert os.path.isfile(os.path.join(workdir, 'samples', 'stage2s_n0004_steps8_w2.png'))
  cost = json.loads(open(os.path.join(workdir, 'train_cost.json')).read())
  assert cost['stage2s_n0002']['steps'] == 2


def test_consistency_run_writes_its_rows_grids_and_cost(workdir):
  """The report: consistency rows at its step counts and every w; the phase's grids and
  its training cost."""
  rows = _report_rows(workdir, 'consistency')
  assert {(r['steps'], r['w']) for r in rows} == {(n, w) for n in (1, 2) for w in (0.0, 1.0)}
  assert all(r['sampler'] == 'consistency' and r['nfe'] == r['steps'] for r in rows)
  cost = json.loads(open(os.path.join(workdir, 'train_cost.json')).read())['consistency']
  assert cost['steps'] == 4 and cost['images'] == 64 and cost['seconds'] > 0
  assert os.path.isfile(os.path.join(workdir, 'samples', 'consistency_steps2_w2.png'))


def test_sample_command_uses_the_dedicated_student(workdir, tmp_path):
  out = str(tmp_path / 's.png')
  proc = subprocess.run([sys.executable, '-m', 'gdistill.sample', f'--workdir={workdir}',
                         '--sampler=stochastic', '--steps=8', '--num=4', '--w=1',
                         f'--output={out}'], cwd=REPO, env=smoke_workdir.subprocess_env(),
                        capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'stage2s_n0004' in proc.stdout + proc.stderr
  assert os.path.isfile(out)
