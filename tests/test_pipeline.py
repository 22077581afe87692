"""The smoke pipeline through the real command line.

Default: every user error is one ``gdistill: error:`` line on stderr, a non-zero
exit, no traceback, and the workdir left as it was (seconds each); one smoke run
(teacher, stage 1, stage 2) writes what it should and samples through the CLI, and a
run killed with SIGKILL and rerun ends with exactly the parameters of the
uninterrupted one (about a minute each).
Slow (``-m slow``): a rerun of a finished run changes nothing; five kills in a row.
"""

import hashlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import orbax.checkpoint as ocp
import smoke_workdir
from gdistill import checkpoint, storage, train, workdir as workdir_lib
from gdistill.networks import init_params, make_net

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_DEVICES = 2
# Error paths take about 2 s on an idle 2-core machine; the limits only stop
# a hang, generously, because a loaded machine can be 50x slower.
ERROR_TIMEOUT_S = 900
RUN_TIMEOUT_S = 3600
# absl's log lines ("W1126 00:25:20.532292 1398... file.py:394] ...") are not
# messages to the user; everything else on stderr is.
_LOG_LINE = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.]+:\d+\] ')
SMOKE_PHASES = ('teacher', 'stage1', 'stage2_n0004', 'stage2_n0002')
SMOKE_SAMPLES = ('teacher_steps4_w0', 'teacher_steps4_w1', 'stage1_steps8_w0', 'stage1_steps8_w2',
                 'stage2_n0004_steps4_w0', 'stage2_n0004_steps4_w2', 'stage2_n0002_steps2_w0',
                 'stage2_n0002_steps2_w2')


def _env():
  """The user's environment: CPU_DEVICES host devices, not conftest's 8."""
  return smoke_workdir.subprocess_env(CPU_DEVICES)


def _command(workdir, data_dir, *overrides):
  cmd = [sys.executable, '-m', 'gdistill.main', '--config=configs/smoke.py',
         f'--workdir={workdir}']
  if data_dir:
    cmd.append(f'--config.data.data_dir={data_dir}')
  return cmd + list(overrides)


def _run(workdir, data_dir, *overrides, timeout=ERROR_TIMEOUT_S):
  return subprocess.run(_command(workdir, data_dir, *overrides), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


def _tree_hash(path):
  """{relative path: sha256} of every file under ``path``; None if it does not exist."""
  if not os.path.exists(path):
    return None
  out = {}
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      with open(full, 'rb') as f:
        out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    for name in dirs:  # empty directories count too
      out.setdefault(os.path.relpath(os.path.join(root, name), path) + '/', 'dir')
  return out


def _user_lines(stderr):
  return [l for l in stderr.splitlines() if l.strip() and not _LOG_LINE.match(l)]


def _assert_one_line_error(proc, *fragments):
  lines = _user_lines(proc.stderr)
  assert proc.returncode != 0, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr and 'Traceback' not in proc.stdout, proc.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith('gdistill: error: '), lines
  for frag in fragments:
    assert frag in lines[0], (frag, lines[0])
  return lines[0]


def _smoke_config():
  spec = importlib.util.spec_from_file_location('smoke', os.path.join(REPO, 'configs', 'smoke.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# ---- bad input: one line, non-zero exit, workdir untouched -----------------------------------

BAD_CONFIGS = {
    'unknown_dataset': (('--config.data.name=nosuchdataset',), ('data.name', 'nosuchdataset')),
    'bad_downsampling': (('--config.model.ch_mult=(1,2,2,2)',), ('model.ch_mult', '28x28')),
    'batch_not_divisible': (('--config.teacher.batch_size=15',), ('teacher.batch_size', '15')),
    'negative_w': (('--config.guidance.w_min=-1',), ('guidance.w_min', '-1')),
    'reversed_w': (('--config.guidance.w_min=3', '--config.guidance.w_max=1'),
                   ('guidance.w_max',)),
    'unknown_key': (('--config.nosuchkey=1',), ('nosuchkey',)),
    'unknown_stage': (("--config.stages=('teacher','stage3')",), ('stages',)),
}


@pytest.mark.parametrize('case', sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_error(case, tmp_path, fashion_data_dir):
  overrides, fragments = BAD_CONFIGS[case]
  workdir = str(tmp_path / 'run')
  proc = _run(workdir, fashion_data_dir, *overrides)
  _assert_one_line_error(proc, *fragments)
  assert not os.path.exists(workdir)


def test_missing_config_file_is_one_line_error(tmp_path):
  workdir = str(tmp_path / 'run')
  cmd = [sys.executable, '-m', 'gdistill.main', '--config=configs/nope.py', f'--workdir={workdir}']
  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=ERROR_TIMEOUT_S)
  _assert_one_line_error(proc, '--config=configs/nope.py', 'not found')
  assert not os.path.exists(workdir)


def test_workdir_that_is_a_file_is_one_line_error(tmp_path, fashion_data_dir):
  path = tmp_path / 'run'
  path.write_text('not a directory')
  proc = _run(str(path), fashion_data_dir)
  _assert_one_line_error(proc, str(path), 'is a file')
  assert path.read_text() == 'not a directory'


def test_dataset_unavailable_offline(tmp_path):
  empty = tmp_path / 'empty_tfds'
  empty.mkdir()
  workdir = str(tmp_path / 'run')
  proc = _run(workdir, str(empty), '--config.data.name=cifar10')
  # 'not prepared', not a ConnectionError after TFDS's ~200 s of download retries.
  _assert_one_line_error(proc, 'cifar10', 'not prepared', str(empty))
  assert not os.path.exists(workdir)
  assert os.listdir(empty) == []  # nothing downloaded or prepared there


def _record_smoke_workdir(path):
  """A workdir as a smoke run leaves it after starting (config.json) plus a file."""
  workdir_lib.check_and_record_config(_smoke_config(), str(path))
  (path / 'samples').mkdir()
  (path / 'samples' / 'marker.txt').write_text('from an earlier run')
  return str(path)


def test_workdir_of_another_config_is_refused(tmp_path, fashion_data_dir):
  workdir = _record_smoke_workdir(tmp_path / 'run')
  before = _tree_hash(workdir)
  proc = _run(workdir, fashion_data_dir, '--config.model.ch=8')
  _assert_one_line_error(proc, 'model.ch', '16', '8')
  assert _tree_hash(workdir) == before


def test_refused_run_opens_no_log_file(tmp_path, fashion_data_dir):
  """The log opens once the workdir is the run's: not in the workdir of another config."""
  workdir = _record_smoke_workdir(tmp_path / 'run')
  proc = _run(workdir, fashion_data_dir, '--config.model.ch=8')
  _assert_one_line_error(proc, 'model.ch')
  assert not os.path.exists(os.path.join(workdir, 'gdistill.log'))
  assert proc.stdout == ''  # gdistill's lines wait for the log, which never opened


def test_workdir_with_checkpoints_but_no_config_is_refused(tmp_path, fashion_data_dir):
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints' / 'teacher').mkdir(parents=True)
  before = _tree_hash(str(workdir))
  proc = _run(str(workdir), fashion_data_dir)
  _assert_one_line_error(proc, 'config.json')
  assert _tree_hash(str(workdir)) == before


def test_workdir_in_use_is_refused_naming_the_holder(tmp_path, fashion_data_dir):
  """A second writer on a workdir whose run is alive: one line naming host, pid, since."""
  from gdistill.workdir_lock import LOCK_FILE  # pylint: disable=g-import-not-at-top
  workdir = _record_smoke_workdir(tmp_path / 'run')
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])
  try:
    with open(os.path.join(workdir, LOCK_FILE), 'w') as f:
      json.dump({'host': socket.gethostname(), 'pid': holder.pid, 'command': 'gdistill.main',
                 'since': '2026-11-30 10:00:00 UTC'}, f)
    before = _tree_hash(workdir)
    proc = _run(workdir, fashion_data_dir)
    _assert_one_line_error(proc, 'in use', str(holder.pid), socket.gethostname(),
                           '2026-11-30 10:00:00')
    assert _tree_hash(workdir) == before
  finally:
    holder.kill()
    holder.wait()


@pytest.fixture(scope='module')
def smoke_teacher_workdir(tmp_path_factory, fashion_data_dir):
  """A workdir holding a smoke teacher checkpoint, written as the loop writes it
  (same meta, same state structure; the weights are zeros: only the meta is read
  before the mismatch is found)."""
  path = str(tmp_path_factory.mktemp('teacher_run') / 'run')
  config = _smoke_config()
  config.data.data_dir = fashion_data_dir
  run = train.Run(config, path)
  phase = run.builder.build(run.plan['teacher'])
  abstract = jax.eval_shape(phase.init_fn, phase.frozen)
  state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  mgr = checkpoint.manager(checkpoint.phase_dir(path, 'teacher'))
  checkpoint.save(mgr, config.teacher.num_steps, state, phase.meta)
  mgr.wait_until_finished()
  mgr.close()
  run.close()
  return path


MISSING_CHECKPOINTS = {
    'missing_teacher': (("--config.teacher_checkpoint=/nonexistent", "--config.stages=('stage1',)"),
                        ('teacher_checkpoint', '/nonexistent')),
    'missing_stage1': (("--config.stages=('stage2',)",), ('stage1', 'no checkpoint')),
}


def _teacher_file(teacher_workdir, name, truncate=False):
  """The smoke teacher exported as one file (gdistill.teacher_file), optionally cut short."""
  from gdistill import teacher_file  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(teacher_workdir), name)
  if not os.path.exists(path):
    teacher_file.export_phase(checkpoint.phase_dir(teacher_workdir, 'teacher'), path,
                              config=_smoke_config())
    if truncate:
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  return path


def _teacher_cases(teacher_workdir):
  cases = dict(MISSING_CHECKPOINTS)
  cases['incompatible_teacher'] = (
      (f'--config.teacher_checkpoint={teacher_workdir}', "--config.stages=('stage1',)",
       '--config.model.ch=8'),
      ('model', "'ch': 16", "'ch': 8"))
  whole = _teacher_file(teacher_workdir, 'teacher.msgpack')
  cut = _teacher_file(teacher_workdir, 'cut.msgpack', truncate=True)
  cases['truncated_teacher_file'] = (
      (f'--config.teacher_checkpoint={cut}', "--config.stages=('stage1',)"),
      (cut, 'truncated or corrupted', 'bytes, expected'))
  cases['teacher_file_of_another_network'] = (
      (f'--config.teacher_checkpoint={whole}', "--config.stages=('stage1',)",
       '--config.model.ch=8'),
      (whole, 'another network', 'model.ch=16 (expected 8)'))
  cases['missing_teacher_file'] = (
      ('--config.teacher_checkpoint=/nonexistent/teacher.msgpack', "--config.stages=('stage1',)"),
      ('teacher_checkpoint', '/nonexistent/teacher.msgpack', 'no such file'))
  return cases


@pytest.fixture(scope='module')
def checkpoint_case(tmp_path_factory, fashion_data_dir, smoke_teacher_workdir):
  """Runs each bad-checkpoint case once (memoised): (process, workdir, teacher hash before)."""
  results = {}

  def run(case):
    if case not in results:
      overrides, _ = _teacher_cases(smoke_teacher_workdir)[case]
      workdir = str(tmp_path_factory.mktemp(case) / 'run')
      before = _tree_hash(smoke_teacher_workdir)
      results[case] = (_run(workdir, fashion_data_dir, *overrides), workdir, before)
    return results[case]
  return run


CHECKPOINT_CASES = sorted(MISSING_CHECKPOINTS) + [
    'incompatible_teacher', 'truncated_teacher_file', 'teacher_file_of_another_network',
    'missing_teacher_file']


@pytest.mark.parametrize('case', CHECKPOINT_CASES)
def test_bad_checkpoint_is_one_line_error(case, checkpoint_case, smoke_teacher_workdir):
  proc, _, teacher_before = checkpoint_case(case)
  _assert_one_line_error(proc, *_teacher_cases(smoke_teacher_workdir)[case][1])
  assert _tree_hash(smoke_teacher_workdir) == teacher_before  # never written to


@pytest.mark.parametrize('case', CHECKPOINT_CASES)
def test_bad_checkpoint_leaves_workdir_untouched(case, checkpoint_case):
  proc, workdir, _ = checkpoint_case(case)
  assert proc.returncode != 0
  assert _tree_hash(workdir) is None, _tree_hash(workdir)


# ---- full runs (slow) ----------------------------------------------------------------------------

def _restore_final(workdir, phase):
  """The sampling params of a phase's latest checkpoint, on one device, as numpy."""
  config = _smoke_config()
  use_w = phase != 'teacher'
  net = make_net(config, num_classes=10, out_ch=1, use_w=use_w)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.eval_shape(lambda r: init_params(net, r, (28, 28, 1)), jax.random.PRNGKey(0))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract)
  params, meta = checkpoint.load_eval_params(checkpoint.phase_dir(workdir, phase), abstract)
  return jax.device_get(params), meta


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory, fashion_data_dir):
  """One uninterrupted smoke run (teacher, stage 1, stage 2 halvings 8 -> 4 -> 2)."""
  workdir = str(tmp_path_factory.mktemp('smoke') / 'run')
  t0 = time.monotonic()
  proc = _run(workdir, fashion_data_dir, timeout=RUN_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return dict(workdir=workdir, proc=proc, seconds=time.monotonic() - t0)


def assert_smoke_workdir(workdir, proc):
  """What a finished smoke run leaves in ``workdir`` (a local path or gs://)."""
  for phase in SMOKE_PHASES:
    steps = [int(d) for d in storage.listdir(checkpoint.phase_dir(workdir, phase)) if d.isdigit()]
    assert len(steps) == 1, (phase, steps)  # a finished phase keeps one, lean, checkpoint
    meta = checkpoint.read_meta(checkpoint.phase_dir(workdir, phase))
    assert meta['phase'] == phase and meta['use_w'] == (phase != 'teacher') and meta['lean']
  assert checkpoint.read_meta(checkpoint.phase_dir(workdir, 'stage2_n0002'))['student_steps'] == 2
  samples = storage.listdir(os.path.join(workdir, 'samples'))
  assert samples == sorted(f'{name}.png' for name in SMOKE_SAMPLES)
  for name in samples:
    assert storage.read_bytes(os.path.join(workdir, 'samples', name))[:8] == b'\x89PNG\r\n\x1a\n'
  recorded = json.loads(storage.read_text(os.path.join(workdir, 'config.json')))
  assert recorded['model']['size'] == 'tiny' and recorded['stage2']['start_steps'] == 8
  events = storage.listdir(os.path.join(workdir, 'tensorboard'))
  assert any(e.startswith('events.out.tfevents') for e in events)
  assert sum(len(storage.read_bytes(os.path.join(workdir, 'tensorboard', e)))
             for e in events) > 1000
  assert proc.stderr.count('gdistill: error') == 0


def test_smoke_run_writes_everything(smoke_run):
  """In the default suite: the real path (loop, checkpoints, the stage chain) once, small."""
  assert_smoke_workdir(smoke_run['workdir'], smoke_run['proc'])


def test_smoke_run_console_shows_each_gdistill_line_once(smoke_run):
  """The terminal: gdistill's lines once, plain (stdout), the log file named first; no
  absl record; the library lines in WORKDIR/gdistill.log."""
  proc, workdir = smoke_run['proc'], smoke_run['workdir']
  out, err = proc.stdout.splitlines(), proc.stderr.splitlines()
  log = os.path.join(workdir, 'gdistill.log')
  assert out[0] == f'log: {log}', out[:3]
  assert not [l for l in out + err if re.match(r'^[IWEF]\d{4} ', l)], proc.stderr[-3000:]
  assert err == [], proc.stderr[-3000:]
  assert len(set(out)) == len(out), out
  assert '[4/4] stage2_n0002 2/2 ' in proc.stdout and 'run ETA' in proc.stdout
  with open(log) as f:
    text = f.read()
  assert 'CheckpointManager' in text  # Orbax's INFO lines
  assert text.count('] done: ') == 1 and out[-1] == f'done: {workdir}'


def test_the_command_reruns_itself_with_glibcs_huge_page_malloc(smoke_run):
  """``python -m gdistill.main`` re-runs itself once with glibc.malloc.hugetlb=1 where it
  applies (cli_setup.malloc_env): the log file says what the run had."""
  from gdistill import cli_setup  # pylint: disable=g-import-not-at-top
  env = cli_setup.malloc_env() or os.environ
  with open(os.path.join(smoke_run['workdir'], 'gdistill.log')) as f:
    text = f.read()
  assert f"process: GLIBC_TUNABLES={env.get('GLIBC_TUNABLES', '')!r}" in text


def test_one_model_loaded_for_two_jobs_prints_two_different_lines(smoke_run, capsys):
  """The main command's eval and translate stages load the same students: each says which
  job it loads for, so the terminal has no line twice."""
  from gdistill.model_store import ModelStore  # pylint: disable=g-import-not-at-top
  store = ModelStore.open(smoke_run['workdir'], _smoke_config())
  capsys.readouterr()
  for purpose in ('eval', 'translate'):
    store.load('stage2_n0002', purpose=purpose)
  lines = capsys.readouterr().out.splitlines()
  assert [l.split(' from ')[0] for l in lines] == ['eval: loaded stage2_n0002',
                                                  'translate: loaded stage2_n0002'], lines


@pytest.mark.slow
def test_rerun_of_finished_run_changes_nothing(smoke_run, fashion_data_dir, tmp_path):
  """Rerunning the same command loads every finished phase and writes nothing new."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'copy')
  shutil.copytree(smoke_run['workdir'], workdir)
  logs = ('tensorboard', 'gdistill.log')  # appended to by every run
  before = {k: v for k, v in _tree_hash(workdir).items() if not k.startswith(logs)}
  proc = _run(workdir, fashion_data_dir, timeout=RUN_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-5000:]
  after = {k: v for k, v in _tree_hash(workdir).items() if not k.startswith(logs)}
  assert after == before
  assert 'already finished' in proc.stdout


def _has_checkpoint(workdir, phase, step=None):
  """Whether the phase has a finished checkpoint (of ``step``): on gs:// a step's objects
  appear while it is written, its commit marker last."""
  d = checkpoint.phase_dir(workdir, phase)
  steps = [int(s) for s in storage.listdir(d)
           if s.isdigit() and ocp.utils.is_checkpoint_finalized(os.path.join(d, s))]
  return bool(steps) if step is None else step in steps


def _run_and_kill(workdir, data_dir, ready, what):
  """Starts the smoke run, SIGKILLs it as soon as ``ready()`` holds."""
  proc = subprocess.Popen(_command(workdir, data_dir), cwd=REPO, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + RUN_TIMEOUT_S
  try:
    while not ready():
      if proc.poll() is not None:
        pytest.fail(f'run ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}')
      if time.monotonic() > deadline:
        pytest.fail(f'no {what} after {RUN_TIMEOUT_S}s')
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
    proc.stderr.close()
  assert proc.returncode == -signal.SIGKILL, f'killed too late, at {what}'


def _assert_same_final_params(workdir, reference):
  for phase in SMOKE_PHASES:
    got, _ = _restore_final(workdir, phase)
    want, _ = _restore_final(reference, phase)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0), got, want)


def _finish(workdir, data_dir, expect='resumed from step'):
  proc = _run(workdir, data_dir, timeout=RUN_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert expect in proc.stdout, proc.stdout[-3000:]
  return proc


def assert_samples_through_the_cli(workdir, out):
  cmd = [sys.executable, '-m', 'gdistill.sample', f'--workdir={workdir}',
         '--steps=2', '--num=1', f'--output={out}']
  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=RUN_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out) as d:
    assert str(d['model']) == 'stage2_n0002' and d['image'].shape == (10, 28, 28, 1)


def test_smoke_run_samples_through_the_cli(smoke_run, tmp_path):
  assert_samples_through_the_cli(smoke_run['workdir'], str(tmp_path / 's.npz'))


def test_resume_after_sigkill_matches_uninterrupted_run(smoke_run, fashion_data_dir, tmp_path):
  """In the default suite: one kill and resume, bit-identical to the uninterrupted run."""
  workdir = str(tmp_path / 'killed')
  _run_and_kill(workdir, fashion_data_dir, lambda: _has_checkpoint(workdir, 'stage1', 2),
                'stage1 step 2')
  assert not _has_checkpoint(workdir, 'stage2_n0002')
  _finish(workdir, fashion_data_dir)
  _assert_same_final_params(workdir, smoke_run['workdir'])


@pytest.mark.slow
def test_second_sigterm_while_saving_corrupts_nothing(smoke_run, fashion_data_dir, tmp_path):
  """SIGTERM during stage 1, and SIGTERM again as soon as the run says it is stopping
  (while it saves): the run still exits with EXIT_PREEMPTED after its checkpoint is
  durable, and the rerun ends with the uninterrupted run's parameters."""
  from gdistill.preemption import EXIT_PREEMPTED  # pylint: disable=g-import-not-at-top
  workdir, log = str(tmp_path / 'twice'), tmp_path / 'twice.log'
  with open(log, 'w') as out:
    proc = subprocess.Popen(_command(workdir, fashion_data_dir), cwd=REPO, env=_env(),
                            stdout=out, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not _has_checkpoint(workdir, 'stage1', 2):
      assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
      time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    while 'received SIGTERM: stopping' not in log.read_text():
      assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
      time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)  # the run is saving the step it stopped at
    assert proc.wait(timeout=RUN_TIMEOUT_S) == EXIT_PREEMPTED, log.read_text()[-3000:]
  finally:
    if proc.poll() is None:
      proc.kill()
  text = log.read_text()
  assert 'received SIGTERM again: still saving the checkpoint' in text, text[-3000:]
  stopped = re.search(r'stage1: stopped by SIGTERM (?:at step (\d+)|after its last step)', text)
  assert stopped, text[-3000:]
  _finish(workdir, fashion_data_dir,  # stopped at its last step: stage 1 is finished
          expect='resumed from step' if stopped.group(1) else 'stage1: already finished')
  _assert_same_final_params(workdir, smoke_run['workdir'])


# (phase, step): step None = the phase directory exists (mid-compile). The smoke halvings
# train 2 steps: their only checkpoint is the finished phase's, so they are killed compiling.
KILL_POINTS = (('teacher', 4), ('stage1', None), ('stage1', 2), ('stage2_n0004', None),
               ('stage2_n0002', None))


@pytest.mark.slow
def test_resume_after_five_sigkills_matches_uninterrupted_run(smoke_run, fashion_data_dir,
                                                              tmp_path):
  workdir = str(tmp_path / 'killed5')
  for phase, step in KILL_POINTS:
    if step is None:
      ready = lambda p=phase: storage.isdir(checkpoint.phase_dir(workdir, p))
    else:
      ready = lambda p=phase, s=step: _has_checkpoint(workdir, p, s)
    _run_and_kill(workdir, fashion_data_dir, ready, f'{phase} step {step}')
  _finish(workdir, fashion_data_dir, expect='already finished')  # the last kill: compiling
  _assert_same_final_params(workdir, smoke_run['workdir'])


@pytest.fixture
def small_disk(tmp_path):
  """A 5 MB filesystem of its own (tmpfs; needs root), unmounted afterwards."""
  mount = tmp_path / 'small'
  mount.mkdir()
  proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=5M', 'tmpfs', str(mount)],
                        capture_output=True, text=True)
  if proc.returncode:
    pytest.skip(f'cannot mount a 5 MB tmpfs here: {proc.stderr.strip()}')
  try:
    yield mount
  finally:
    subprocess.run(['umount', str(mount)], check=False)


@pytest.mark.slow
def test_full_disk_is_one_line_error_and_the_run_resumes_once_there_is_space(
    small_disk, smoke_run, fashion_data_dir):
  """The disk fills mid-run: one line naming the failure, exit non-zero, the checkpoints
  already written stay loadable: with space again the same command finishes the run
  with the uninterrupted run's parameters."""
  workdir = str(small_disk / 'run')
  filler = small_disk / 'filler'
  with open(filler, 'wb') as f:  # ~4.5 MB left: the teacher's first full state (~2.9 MB)
    f.write(b'\0' * int(0.5 * 2**20))  # fits, the second does not
  proc = _run(workdir, fashion_data_dir, timeout=RUN_TIMEOUT_S)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('gdistill: error: ')]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert errors[0].startswith('gdistill: error: cannot write: ') and 'No space left' in errors[0]
  # No traceback: TensorStore's callbacks into the save's closed event loop are dropped,
  # Orbax's logged tracebacks are cut to one line each (cli_setup).
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  filler.unlink()  # and room for the whole smoke run
  subprocess.run(['mount', '-o', 'remount,size=64M', str(small_disk)], check=True)
  _finish(workdir, fashion_data_dir)
  _assert_same_final_params(workdir, smoke_run['workdir'])
