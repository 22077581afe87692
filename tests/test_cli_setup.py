"""The command line's error reporting: a failed write is one line, whatever the layers
under it (Orbax, TensorStore, asyncio) print on their way down."""

import errno
import sys

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


def test_closed_event_loop_callbacks_are_dropped_other_errors_printed(monkeypatch, capsys):
  printed = []
  monkeypatch.setattr(sys, 'excepthook', lambda *a: printed.append(a[1]))
  with pytest.raises(SystemExit):
    with cli_setup.user_errors():  # installs the hook, as every command does
      raise RuntimeError('No space left on device')
  cli_setup._quiet_closed_loop_callbacks()  # pylint: disable=protected-access  # idempotent
  closed, other = RuntimeError('Event loop is closed'), RuntimeError('something else')
  sys.excepthook(RuntimeError, closed, None)  # what TensorStore calls for its callbacks
  sys.excepthook(RuntimeError, other, None)
  assert printed == [other]
  assert capsys.readouterr().err.count('gdistill: error: cannot write:') == 1
