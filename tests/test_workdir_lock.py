"""One writer per workdir (gdistill.workdir_lock): refused while a live process holds
the lock, taken over from a dead one, never taken by readers."""

import json
import os
import socket
import subprocess
import sys

import pytest

from gdistill import workdir_lock
from gdistill.workdir_lock import LOCK_FILE, WorkdirInUse


def _write_lock(workdir, **holder):
  os.makedirs(workdir, exist_ok=True)
  info = {'host': socket.gethostname(), 'command': 'gdistill.main',
          'since': '2026-11-30 10:00:00 UTC'} | holder
  with open(os.path.join(workdir, LOCK_FILE), 'w') as f:
    json.dump(info, f)


@pytest.fixture
def live_pid():
  proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
  yield proc.pid
  proc.kill()
  proc.wait()


def test_lock_is_taken_and_released(tmp_path):
  path = workdir_lock.acquire(str(tmp_path), 'gdistill.main')
  with open(path) as f:
    holder = json.load(f)
  assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
  workdir_lock.release(path)
  assert not os.path.exists(path)


def test_second_writer_is_refused_naming_the_holder(tmp_path, live_pid):
  _write_lock(str(tmp_path), pid=live_pid)
  with pytest.raises(WorkdirInUse) as e:
    workdir_lock.acquire(str(tmp_path), 'gdistill.main')
  message = str(e.value)
  assert str(live_pid) in message and socket.gethostname() in message
  assert '2026-11-30 10:00:00' in message and '\n' not in message
  with open(os.path.join(tmp_path, LOCK_FILE)) as f:
    assert json.load(f)['pid'] == live_pid  # the holder's lock is untouched


def test_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
  proc = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  dead = int(proc.stdout)
  _write_lock(str(tmp_path), pid=dead)
  path = workdir_lock.acquire(str(tmp_path), 'gdistill.main')
  with open(path) as f:
    assert json.load(f)['pid'] == os.getpid()
  assert any(str(dead) in r.getMessage() and 'taking over' in r.getMessage()
             for r in caplog.records)
  workdir_lock.release(path)


def test_lock_of_another_host_is_not_taken(tmp_path):
  _write_lock(str(tmp_path), pid=1, host='some-other-host')
  with pytest.raises(WorkdirInUse, match='some-other-host'):
    workdir_lock.acquire(str(tmp_path), 'gdistill.main')


def test_release_leaves_another_process_lock(tmp_path, live_pid):
  _write_lock(str(tmp_path), pid=live_pid)
  workdir_lock.release(os.path.join(tmp_path, LOCK_FILE))
  assert os.path.exists(os.path.join(tmp_path, LOCK_FILE))
