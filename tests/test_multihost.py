"""Multi-host start-up and a two-process run of the whole smoke pipeline.

Two processes on this machine, joined by ``jax.distributed`` over localhost
(gloo CPU collectives), stand in for two hosts: each reads its own half of
every batch and holds its own CPU device(s); the run must end with the same
parameters as one process with as many devices, and write each file once.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from gdistill import cli_setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, 'configs', 'smoke.py')
PHASES = ('teacher', 'stage1', 'stage2_n0004', 'stage2_n0002')


# ---- start-up: environment -> jax.distributed.initialize arguments -------------


def test_distributed_kwargs_pass_launcher_env_through():
  env = {'JAX_COORDINATOR_ADDRESS': 'gpu-a:1234', 'JAX_NUM_PROCESSES': '2',
         'JAX_PROCESS_ID': '1'}
  assert cli_setup.distributed_kwargs(env) == {
      'coordinator_address': 'gpu-a:1234', 'num_processes': 2, 'process_id': 1}


def test_distributed_kwargs_empty_lets_jax_detect_the_cluster():
  assert cli_setup.distributed_kwargs({}) == {}
  assert cli_setup.distributed_kwargs({'JAX_NUM_PROCESSES': '', 'JAX_PROCESS_ID': ''}) == {}


@pytest.mark.parametrize('env, says', [
    ({'JAX_NUM_PROCESSES': 'two', 'JAX_PROCESS_ID': '0'}, "JAX_NUM_PROCESSES='two'"),
    ({'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '2'}, 'JAX_PROCESS_ID is not'),
    ({'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '2'},
     'JAX_PROCESS_ID=2'),
    ({'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '0'}, 'JAX_COORDINATOR_ADDRESS is not set'),
])
def test_distributed_kwargs_bad_env_is_one_line_error(env, says, capsys):
  with pytest.raises(SystemExit) as e:
    cli_setup.distributed_kwargs(env)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert says in err and len(err.strip().splitlines()) == 1


class _Config:
  def __init__(self, multihost):
    self.multihost = multihost


def test_maybe_initialize_distributed(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  calls, updates = [], []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.config, 'update', lambda k, v: updates.append((k, v)))
  env = {'JAX_COORDINATOR_ADDRESS': '127.0.0.1:5555', 'JAX_NUM_PROCESSES': '2',
         'JAX_PROCESS_ID': '0'}
  # Off by default; on by config, by JAX_NUM_PROCESSES > 1, or on a TPU pod.
  assert not cli_setup.maybe_initialize_distributed(_Config(False), environ={})
  assert not calls
  assert cli_setup.maybe_initialize_distributed(_Config(False), environ=env)
  assert calls[-1] == {'coordinator_address': '127.0.0.1:5555', 'num_processes': 2,
                       'process_id': 0}
  assert updates[-1] == ('jax_cpu_collectives_implementation', 'gloo')
  assert cli_setup.maybe_initialize_distributed(_Config(True), environ={})
  assert calls[-1] == {}
  assert cli_setup.maybe_initialize_distributed(
      _Config(False), environ={'TPU_WORKER_HOSTNAMES': 'a,b'})
  # A collectives implementation chosen by the user is left alone.
  n = len(updates)
  cli_setup.maybe_initialize_distributed(
      _Config(True), environ={'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'mpi'})
  assert len(updates) == n


# ---- two processes vs one: the smoke pipeline ------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _main(workdir, log, *, devices_per_process, extra_env=None, overrides=()):
  """Starts ``gdistill.main`` on the smoke config; output goes to ``log`` (a
  file, not a pipe: a full pipe would stall one process and so both)."""
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  env.update({'GDISTILL_CPU_DEVICES': str(devices_per_process), 'JAX_PLATFORMS': 'cpu',
              'PYTHONPATH': REPO + os.pathsep + env.get('PYTHONPATH', '')})
  env.update(extra_env or {})
  cmd = [sys.executable, '-m', 'gdistill.main', f'--config={SMOKE}', f'--workdir={workdir}',
         *overrides]
  with open(log, 'w') as f:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def _wait(procs, logs, timeout):
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outs = []
  for p, log in zip(procs, logs):
    with open(log) as f:
      outs.append(f.read())
    assert p.returncode == 0, outs[-1][-4000:]
  return outs


def _final_params(workdir, phase):
  """(step, {path: np.ndarray}) of the latest checkpoint's params, read as
  host arrays (the checkpoint was written from another device layout)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from gdistill import checkpoint  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, 'checkpoints', phase)
  step = max(int(d) for d in os.listdir(directory) if d.isdigit())
  path = os.path.join(directory, str(step), 'state')
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path)
  tree = getattr(meta, 'item_metadata', meta)
  tree = getattr(tree, 'tree', tree)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = ckptr.restore(path, restore_args=restore_args)
  key = checkpoint.sampling_key(checkpoint.read_meta(directory))  # lean: sampling params only
  return step, {'/'.join(k): np.asarray(v)
                for k, v in traverse_util.flatten_dict(state[key]).items()}


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  """2 processes x 2 CPU devices (gloo over localhost) == 1 process x 4 devices.

  The sample grids have 10 images, which do not split over 4 devices, and the
  batch rows of each process come from its own reads: both paths a single
  process never takes with several hosts.
  """
  single, multi = str(tmp_path / 'single'), str(tmp_path / 'multi')
  port = _free_port()
  dist = lambda i: {'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': '2',
                    'JAX_PROCESS_ID': str(i)}
  logs = [str(tmp_path / f'{name}.log') for name in ('p0', 'p1', 'single')]
  procs = [_main(multi, logs[0], devices_per_process=2, extra_env=dist(0)),
           _main(multi, logs[1], devices_per_process=2, extra_env=dist(1)),
           _main(single, logs[2], devices_per_process=4)]
  outs = _wait(procs, logs, timeout=1500)
  # Only process 0 reports.
  assert 'done:' in outs[0] and 'done:' not in outs[1], outs[1][-2000:]
  assert sorted(os.listdir(os.path.join(multi, 'samples'))) == sorted(
      os.listdir(os.path.join(single, 'samples')))
  assert not [f for f in os.listdir(os.path.join(multi, 'samples')) if 'tmp' in f]
  for phase in PHASES:
    step_m, multi_params = _final_params(multi, phase)
    step_s, single_params = _final_params(single, phase)
    assert step_m == step_s
    assert multi_params.keys() == single_params.keys()
    for k in single_params:
      # Not bitwise: gloo sums the two processes' partial gradients in another order.
      np.testing.assert_allclose(multi_params[k], single_params[k], rtol=1e-4, atol=2e-5,
                                 err_msg=f'{phase}: {k}')


def _wait_for(path, text, procs, timeout):
  """Waits until the file at ``path`` contains ``text`` (fails if a process ends first)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    with open(path) as f:
      if text in f.read():
        return
    assert all(p.poll() is None for p in procs), f'a process ended before {text!r}'
    time.sleep(0.2)
  raise AssertionError(f'no {text!r} in {path} after {timeout} s')


@pytest.mark.slow
def test_sigterm_to_one_host_stops_both_at_one_step_and_resume_matches(tmp_path):
  """A preemption notice reaches one of two hosts (SIGTERM to process 1 only): JAX's
  preemption service makes both save the same step and exit with EXIT_PREEMPTED;
  rerunning both resumes there and ends with the parameters of an uninterrupted run."""
  from gdistill.preemption import EXIT_PREEMPTED  # pylint: disable=g-import-not-at-top
  overrides = ["--config.stages=('teacher',)", '--config.teacher.num_steps=200',
               '--config.teacher.checkpoint_every=1000', '--config.log_every=1']

  def both(workdir, name):
    port = _free_port()
    logs = [str(tmp_path / f'{name}_p{i}.log') for i in range(2)]
    procs = [_main(workdir, logs[i], devices_per_process=1, overrides=overrides,
                   extra_env={'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}',
                              'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': str(i)})
             for i in range(2)]
    return procs, logs

  reference, stopped = str(tmp_path / 'reference'), str(tmp_path / 'stopped')
  _wait(*both(reference, 'reference'), timeout=1200)
  procs, logs = both(stopped, 'stopped')
  try:
    _wait_for(logs[0], 'teacher 3/200', procs, timeout=600)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outs = [open(log).read() for log in logs]  # pylint: disable=consider-using-with
  assert codes == [EXIT_PREEMPTED] * 2, outs[1][-3000:]
  saved = {int(m) for out in outs
           for m in re.findall(r'teacher: stopped by SIGTERM at step (\d+) of 200', out)}
  assert len(saved) == 1, outs  # both processes name the one step they saved
  step = saved.pop()
  directory = os.path.join(stopped, 'checkpoints', 'teacher')
  assert sorted(int(d) for d in os.listdir(directory) if d.isdigit()) == [step]
  assert 3 <= step < 200
  outs = _wait(*both(stopped, 'resumed'), timeout=1200)
  assert f'teacher: resumed from step {step}' in outs[0], outs[0][-3000:]
  got_step, got = _final_params(stopped, 'teacher')
  want_step, want = _final_params(reference, 'teacher')
  assert got_step == want_step == 200 and got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
