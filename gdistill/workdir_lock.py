"""One writer per workdir: ``WORKDIR/gdistill.lock`` names the process that writes there.

``gdistill.main``, ``gdistill.evaluate`` and ``gdistill.translate`` hold it while they
run; a second writer is refused with one line naming the holder (host, pid, command,
since when). A lock left by a process that no longer exists on this host (a SIGKILL, a
crash, a reboot) is taken over with a warning. Readers (``gdistill.sample``) never take
it. On multi-host runs process 0 holds it for the run.

On Cloud Storage (``gs://``) the lock is an object created with the precondition "no
such object yet", so of two writers starting together one gets it. A lock left there by
a host that is gone cannot be checked from another host: remove it by hand
(``gcloud storage rm gs://.../gdistill.lock``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time

from absl import logging

from gdistill import storage
from gdistill.workdir import WorkdirError

LOCK_FILE = 'gdistill.lock'
_CREATED = set()  # workdirs this process created to hold their lock


class WorkdirInUse(WorkdirError):
  """Another live process writes to the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _read(path: str) -> dict:
  try:
    return json.loads(storage.read_text(path))
  except (OSError, ValueError):
    return {}


def _write_new(path: str, info: dict) -> bool:
  """Creates the lock file atomically; False if it exists."""
  return storage.create_new(path, json.dumps(info).encode())


def _describe(holder: dict, path: str) -> str:
  return (f'{holder.get("command", "a gdistill command")} (pid {holder.get("pid", "?")} on '
          f'{holder.get("host", "?")}, since {holder.get("since", "?")}; lock {path})')


def acquire(workdir: str, command: str) -> str:
  """Takes the workdir's lock for this process; returns the lock file's path.

  Raises:
    WorkdirInUse: a live process (or one on another host, which cannot be checked)
      holds it.
  """
  path = os.path.join(workdir, LOCK_FILE)
  me = {'host': socket.gethostname(), 'pid': os.getpid(), 'command': command,
        'since': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
  if not storage.is_remote(workdir) and not os.path.isdir(workdir):
    os.makedirs(workdir)
    _CREATED.add(os.path.abspath(workdir))
  for _ in range(3):
    if _write_new(path, me):
      return path
    holder = _read(path)
    if not holder:  # being written by its creator right now, or emptied: look again
      time.sleep(0.2)
      holder = _read(path)
    if holder.get('host') == me['host'] and holder.get('pid') == me['pid']:
      return path  # ours already (a second command in one process)
    if holder.get('host') == me['host'] and isinstance(holder.get('pid'), int) and \
        not _alive(holder['pid']):
      logging.warning('workdir %s: taking over the lock of %s, which no longer runs',
                      workdir, _describe(holder, path))
      storage.remove(path)
      continue
    if not holder:
      raise WorkdirInUse(f'workdir {workdir}: lock {path} exists but is unreadable: another '
                         f'gdistill command may be starting; if none runs, remove that file')
    raise WorkdirInUse(f'workdir {workdir} is in use by {_describe(holder, path)}: wait for '
                       f'it to finish, or remove the lock if that process is gone')
  raise WorkdirInUse(f'workdir {workdir}: could not take the lock {path} (other processes '
                     f'keep taking it)')


def release(path: str) -> None:
  """Removes the lock if this process still holds it (and the workdir, if taking the
  lock created it and nothing else was written there: a run refused early leaves none)."""
  holder = _read(path)
  if holder.get('pid') == os.getpid() and holder.get('host') == socket.gethostname():
    storage.remove(path)
  workdir = os.path.dirname(storage.absolute(path))
  if workdir in _CREATED:
    _CREATED.discard(workdir)
    with contextlib.suppress(OSError):
      os.rmdir(workdir)  # only if empty


@contextlib.contextmanager
def held(workdir: str, command: str | None = None):
  """Holds the workdir's lock for the ``with`` block (process 0 of a multi-host run)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    yield None
    return
  path = acquire(workdir, command or ' '.join(['python -m', *sys.argv[:1]]))
  try:
    yield path
  finally:
    release(path)
