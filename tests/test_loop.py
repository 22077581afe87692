"""The training loop in process, on the smoke teacher: lean finished phases, training a
phase longer, divergence (nothing non-finite is ever saved)."""

import copy
import dataclasses
import os
import re
import shutil
import signal
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gdistill import checkpoint, loop, preemption, train
from tests.test_pipeline import _smoke_config


def _make_run(path, fashion_data_dir, **teacher):
  config = _smoke_config()
  config.data.data_dir = fashion_data_dir
  config.teacher.update(lr_decay='constant', **teacher)
  return train.Run(config, str(path))


@pytest.fixture(scope='module')
def smoke(tmp_path_factory, fashion_data_dir):
  """One Run (data, plan, builder: one compiled teacher step) for the tests' workdirs."""
  run = _make_run(tmp_path_factory.mktemp('loop'), fashion_data_dir)
  yield run
  run.close()


def _in(run, path, **ctx):
  """``run`` writing to ``path``."""
  out = copy.copy(run)
  out.ctx = dataclasses.replace(run.ctx, workdir=str(path), **ctx)
  return out


def _teacher(run, num_steps, checkpoint_every=2):
  phase = run.builder.build(run.plan['teacher'])
  return dataclasses.replace(phase, num_steps=num_steps, checkpoint_every=checkpoint_every)


def _steps(path):
  return sorted(int(d) for d in os.listdir(checkpoint.phase_dir(str(path), 'teacher'))
                if d.isdigit())


@pytest.mark.slow  # CI time (see README: slow tests)
def test_finished_phase_keeps_only_its_sampling_parameters(smoke, tmp_path):
  run = _in(smoke, tmp_path)
  params = loop.run_phase(_teacher(run, 3), run.ctx)
  assert _steps(tmp_path) == [3]
  directory = checkpoint.phase_dir(str(tmp_path), 'teacher')
  meta = checkpoint.read_meta(directory)
  assert meta['lean'] and meta['has_ema']
  saved = ocp.PyTreeCheckpointer().metadata(os.path.join(directory, '3', 'state')).item_metadata
  assert set(saved.keys()) == {'ema_params'}  # no optimiser state, no raw parameters
  again = loop.run_phase(_teacher(run, 3), run.ctx)  # loaded, not retrained
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again), jax.device_get(params))
  with pytest.raises(checkpoint.CheckpointError, match='keep_train_state'):
    loop.run_phase(_teacher(run, 5), run.ctx)
  assert _steps(tmp_path) == [3]


@pytest.mark.slow
def test_phase_kept_whole_trains_longer_as_if_uninterrupted(smoke, tmp_path):
  once = _in(smoke, tmp_path / 'once')
  want = loop.run_phase(_teacher(once, 4), once.ctx)
  twice = _in(smoke, tmp_path / 'twice', keep_train_state=True)
  loop.run_phase(_teacher(twice, 2), twice.ctx)
  got = loop.run_phase(_teacher(twice, 4), twice.ctx)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))


@pytest.mark.slow  # its own optimiser: one more compilation
def test_diverging_phase_stops_and_saves_nothing_non_finite(tmp_path, fashion_data_dir):
  run = _make_run(tmp_path, fashion_data_dir, learning_rate=1e9, warmup_steps=0)
  run.ctx.log_every = 100  # the check does not wait for a log line
  with pytest.raises(loop.TrainingDiverged, match=r'teacher: .* at step \d+'):
    loop.run_phase(_teacher(run, 20), run.ctx)
  if _steps(tmp_path):  # what was saved before the step that diverged is finite
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                            jax.eval_shape(_teacher(run, 1).init_fn, {}).ema_params)
    params, _ = checkpoint.load_eval_params(checkpoint.phase_dir(str(tmp_path), 'teacher'),
                                            abstract)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(params)))
  run.close()


def _signal_when_started(path, signum):
  """Sends ``signum`` to this process once the teacher phase has started (its
  checkpoint directory exists: the step is still compiling)."""
  def wait():
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
      if os.path.isdir(checkpoint.phase_dir(str(path), 'teacher')):
        os.kill(os.getpid(), signum)
        return
      time.sleep(0.01)
  thread = threading.Thread(target=wait, daemon=True)
  thread.start()
  return thread


# Slow (100 s each): the fast suite resumes after SIGKILL (test_pipeline), the harder case.
@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_saves_the_step_reached_and_resume_matches(smoke, tmp_path, signum):
  """SIGTERM / SIGINT: the step in flight finishes, its checkpoint is written, the
  phase raises Preempted; resuming gives the uninterrupted run's parameters exactly."""
  once = _in(smoke, tmp_path / 'once')
  want = loop.run_phase(_teacher(once, 6, checkpoint_every=100), once.ctx)
  run = _in(smoke, tmp_path / 'stopped')
  handler = signal.getsignal(signum)  # SIG_IGN for SIGINT under nohup or `&`
  thread = _signal_when_started(tmp_path / 'stopped', signum)
  with pytest.raises(preemption.Preempted, match=r'teacher: stopped by SIG\w+ at step (\d+)') as e:
    loop.run_phase(_teacher(run, 6, checkpoint_every=100), run.ctx)
  thread.join()
  stopped_at = int(re.search(r'at step (\d+)', str(e.value)).group(1))
  assert _steps(tmp_path / 'stopped') == [stopped_at] and stopped_at < 6
  assert signal.getsignal(signum) == handler  # restored
  got = loop.run_phase(_teacher(run, 6, checkpoint_every=100), run.ctx)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))


@pytest.fixture(scope='module')
def two_checkpoints(smoke, tmp_path_factory):
  """A teacher stopped at step 4 keeping its full state: checkpoints 2 and 4, and the
  parameters of each (the reference a fallback must reproduce)."""
  path = tmp_path_factory.mktemp('two')
  run = _in(smoke, path / 'run', keep_train_state=True)
  by_step = {n: jax.device_get(loop.run_phase(_teacher(run, n), run.ctx)) for n in (2, 4)}
  return run, checkpoint.phase_dir(run.ctx.workdir, 'teacher'), by_step


def _files(directory):
  return sorted(os.path.relpath(os.path.join(root, f), directory)
                for root, _, files in os.walk(directory) for f in files)


# Orbax's reads abandoned after the one that failed print as "Exception ignored in" (the
# commands drop them: cli_setup._is_abandoned_orbax_read; pytest shows them as warnings).
@pytest.mark.filterwarnings('ignore:Exception ignored in. <coroutine object '
                            '_read_array_index_and_device_put:'
                            'pytest.PytestUnraisableExceptionWarning')
def test_truncated_file_of_newest_checkpoint_falls_back_to_the_intact_one(two_checkpoints):
  """Any file of the newest checkpoint cut in half: the phase resumes from the newest
  checkpoint that reads (or from the newest, if what was cut is not needed), never from
  step 0 and never with a traceback; the broken one is set aside, not deleted."""
  run, directory, by_step = two_checkpoints
  pristine = directory + '.pristine'
  shutil.copytree(directory, pristine)
  phase = _teacher(run, 4)
  fell_back = []
  for name in _files(os.path.join(pristine, '4')):
    shutil.rmtree(directory)
    shutil.copytree(pristine, directory)
    path = os.path.join(directory, '4', name)
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
    mgr = checkpoint.manager(directory, max_to_keep=5)
    step, what = loop.latest_state(phase, run.ctx, mgr)
    mgr.close()
    assert step in (2, 4), name
    if step == 4:  # read intact: the finished phase's sampling parameters
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(what), by_step[4])
    else:
      fell_back.append(name)
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(what.ema_params), by_step[2])
      assert any(d.startswith('broken.4.') for d in os.listdir(directory)), name
  assert any(n.startswith('state/') for n in fell_back), fell_back  # the data files count
  shutil.rmtree(directory)
  shutil.copytree(pristine, directory)


def test_no_readable_checkpoint_is_one_line_error_naming_the_directory(two_checkpoints,
                                                                       tmp_path):
  run, directory, _ = two_checkpoints
  broken = str(tmp_path / 'teacher')
  shutil.copytree(directory, broken)
  for step in ('2', '4'):
    for name in _files(os.path.join(broken, step, 'state')):
      path = os.path.join(broken, step, 'state', name)
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  abstract = jax.eval_shape(_teacher(run, 1).init_fn, {}).ema_params
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                          abstract)
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.load_eval_params(broken, abstract)
  assert broken in str(e.value) and 'no readable checkpoint' in str(e.value)
  assert '\n' not in str(e.value)
