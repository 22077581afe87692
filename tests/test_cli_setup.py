"""The command line's error reporting: a failed write is one line, whatever the layers
under it (Orbax, TensorStore, asyncio) print on their way down."""

import asyncio
import errno
import os
import sys
import time
import types

import pytest

from gdistill import cli_setup


def test_write_failure_finds_the_os_error_under_wrappers():
  cause = OSError(errno.ENOSPC, 'No space left on device', '/run/checkpoints/teacher/6')
  try:
    try:
      raise cause
    except OSError as e:
      raise RuntimeError('save failed') from e
  except RuntimeError as wrapped:
    assert cli_setup.write_failure(wrapped) == ('No space left on device: '
                                                '/run/checkpoints/teacher/6')
  assert cli_setup.write_failure(ValueError('a bad value')) is None


@pytest.mark.parametrize('code, says', [(errno.EROFS, 'Read-only file system'),
                                        (errno.ENOTDIR, 'Not a directory'),
                                        (errno.EACCES, 'Permission denied')])
def test_write_failure_names_every_unwritable_case(code, says):
  error = OSError(code, says, '/run/checkpoints')
  assert cli_setup.write_failure(error) == f'{says}: /run/checkpoints'
  # TensorStore's form: the OS error only in the text of its own exception type.
  text = f'RESOURCE_EXHAUSTED: Failed writing: "/run/x": {says} [os_error_code={code}]'
  assert says in cli_setup.write_failure(RuntimeError(text))


def test_write_failure_keeps_the_cause_of_a_long_line():
  text = 'RESOURCE_EXHAUSTED: Failed writing: "' + 'x' * 600 + '": No space left on device'
  line = cli_setup.write_failure(RuntimeError(text))
  assert len(line) < 400 and line.endswith('No space left on device')


def _unraisable(error, tb):
  return types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=tb,
                               err_msg=None, object=None)


def _closed_loop_callback_error():
  """The exception TensorStore's callback meets, with its traceback as TensorStore
  reports it (called from C: only asyncio's frames)."""
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(lambda: None)
  except RuntimeError as e:
    return _unraisable(e, e.__traceback__.tb_next)  # without this test's frame
  raise AssertionError('a closed loop accepted a callback')


def test_closed_event_loop_callbacks_are_dropped_others_reported(monkeypatch, capsys):
  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', lambda u: reported.append(u.exc_value))
  with pytest.raises(SystemExit):
    with cli_setup.user_errors():  # installs the hook, as every command does
      raise RuntimeError('No space left on device')
  cli_setup._quiet_closed_loop_callbacks()  # pylint: disable=protected-access  # idempotent
  closed = _closed_loop_callback_error()
  sys.unraisablehook(closed)  # what TensorStore's callback reports
  other = _unraisable(RuntimeError('something else'), None)
  sys.unraisablehook(other)
  # The same message raised by code of ours (a frame outside asyncio) is still reported.
  try:
    raise RuntimeError('Event loop is closed')
  except RuntimeError as e:
    ours = _unraisable(e, e.__traceback__)
  sys.unraisablehook(ours)
  assert reported == [other.exc_value, ours.exc_value]
  assert capsys.readouterr().err.count('gdistill: error: cannot write:') == 1


def test_tensorstore_reports_a_closed_loop_callback_as_dropped(monkeypatch):
  """The real thing: a TensorStore future awaited on a loop that is closed before it
  completes reports through sys.unraisablehook, and the hook drops it."""
  ts = pytest.importorskip('tensorstore')
  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', lambda u: reported.append(u))
  cli_setup._quiet_closed_loop_callbacks()  # pylint: disable=protected-access
  promise, future = ts.Promise.new()
  loop = asyncio.new_event_loop()
  task = loop.create_task(_await(future))
  loop.run_until_complete(asyncio.sleep(0.01))
  loop.close()
  promise.set_result(1)  # its callback meets the closed loop
  deadline = time.monotonic() + 5
  while not future.done() and time.monotonic() < deadline:
    time.sleep(0.01)
  assert future.done() and reported == []
  del task


async def _await(future):
  return await future


# A coroutine of Orbax's shape (serialization.py's _read_array_index_and_device_put): any
# exception of the read, GeneratorExit included, wrapped into another.
_READ = """
async def read(wait):
  try:
    return await wait
  except BaseException as e:
    raise Exception('Encountered error while reading array index') from e
"""


def _coroutine_in(filename):
  namespace = {}
  exec(compile(_READ, filename, 'exec'), namespace)  # pylint: disable=exec-used
  return namespace['read']


@pytest.mark.parametrize('where, dropped', [
    (f'{os.sep}site-packages{os.sep}orbax{os.sep}checkpoint{os.sep}serialization.py', True),
    (f'{os.sep}work{os.sep}gdistill{os.sep}loop.py', False)])
def test_an_abandoned_orbax_read_is_dropped_others_reported(monkeypatch, where, dropped):
  """A read closed unfinished (garbage-collected after a sibling read failed) reports
  through sys.unraisablehook; the hook drops Orbax's, and reports the same from elsewhere."""
  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', lambda u: reported.append(u))
  cli_setup._quiet_closed_loop_callbacks()  # pylint: disable=protected-access
  loop = asyncio.new_event_loop()
  try:
    coro = _coroutine_in(where)(loop.create_future())
    coro.send(None)  # suspended at its await, as the abandoned reads are
    del coro  # closed by the garbage collector: GeneratorExit, wrapped
  finally:
    loop.close()
  assert len(reported) == int(not dropped)
  if reported:
    assert isinstance(reported[0].exc_value.__cause__, GeneratorExit)


@pytest.mark.parametrize('environ, glibc, thp, want', [
    ({}, 'glibc 2.36', 'always [madvise] never', 'glibc.malloc.hugetlb=1'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, 'glibc 2.39', '[always] madvise never',
     'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'),
    ({}, 'glibc 2.31', 'always [madvise] never', None),  # no such tunable before 2.35
    ({}, 'musl', 'always [madvise] never', None),  # not glibc (musl, macOS)
    ({}, 'glibc 2.36', 'always madvise [never]', None),  # huge pages off
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, 'glibc 2.36', '[madvise]', None),  # user's
    ({'GDISTILL_MALLOC': '0'}, 'glibc 2.36', '[madvise]', None),  # turned off
])
def test_malloc_env(environ, glibc, thp, want):
  env = cli_setup.malloc_env(environ, glibc=glibc, thp=thp)
  assert (env and env['GLIBC_TUNABLES']) == want
  if env:
    assert env == {**environ, 'GLIBC_TUNABLES': want}
