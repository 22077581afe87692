"""One smoke-config workdir per test session, trained through every stage that
translation needs, shared by the translate, sample and notebook tests.

The pipeline runs as the user runs it (``python -m gdistill.main`` in a
subprocess, two CPU devices). Set GDISTILL_TEST_SMOKE_WORKDIR to reuse a
workdir across sessions (finished phases load instead of retraining).
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = "('teacher','stage1','stage2','translate')"
_STATE = {}


def subprocess_env(cpu_devices: int = 2) -> dict:
  """The environment of a gdistill command: the checkout importable, and
  ``cpu_devices`` host devices instead of the 8 that conftest.py asks for."""
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if 'xla_force_host_platform_device_count' not in f]
  env['XLA_FLAGS'] = ' '.join(flags)
  env['GDISTILL_CPU_DEVICES'] = str(cpu_devices)
  env['PYTHONPATH'] = os.pathsep.join([REPO] + [p for p in [env.get('PYTHONPATH')] if p])
  return env


def train_command(workdir: str, data_dir: str = '') -> list:
  return [sys.executable, '-m', 'gdistill.main', '--config=configs/smoke.py',
          f'--workdir={workdir}', f'--config.stages={STAGES}',
          f'--config.data.data_dir={data_dir}']


def get(data_dir: str = '') -> str:
  """The path of the session's finished smoke workdir (trained on first use)."""
  if 'error' in _STATE:
    raise RuntimeError(_STATE['error'])
  if 'path' in _STATE:
    return _STATE['path']
  path = os.environ.get('GDISTILL_TEST_SMOKE_WORKDIR')
  if not path:
    base = tempfile.mkdtemp(prefix='gdistill_smoke_')
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    path = os.path.join(base, 'workdir')
  try:
    # CPU time is about 2 minutes; the limit is for a machine shared with other work.
    proc = subprocess.run(train_command(path, data_dir), cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=3600)
  except subprocess.TimeoutExpired as e:
    _STATE['error'] = f'smoke pipeline timed out after {e.timeout} s'
    raise RuntimeError(_STATE['error']) from e
  if proc.returncode:
    _STATE['error'] = f'smoke pipeline failed ({proc.returncode}):\n{proc.stderr[-4000:]}'
    raise RuntimeError(_STATE['error'])
  _STATE['path'] = path
  return path


def fake_workdir(path: str, phases=('teacher', 'stage1', 'stage2_n0004', 'stage2_n0002',
                                    'encoder_n0004', 'encoder_n0002')) -> str:
  """A workdir whose checkpoints hold only meta (and a dummy state): enough for the
  commands' argument checks, which must fail before any parameters load."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gdistill import checkpoint  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('smoke', os.path.join(REPO, 'configs', 'smoke.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(module.get_config().to_dict(), f)
  for phase in phases:
    mgr = checkpoint.manager(checkpoint.phase_dir(path, phase))
    checkpoint.save(mgr, 1, {'step': np.zeros((), np.int32)}, {
        'phase': phase, 'use_w': phase != 'teacher', 'num_classes': 10,
        'image_shape': [28, 28, 1], 'dataset': 'fashion_mnist', 'has_ema': False})
    mgr.wait_until_finished()
    mgr.close()
  return path
