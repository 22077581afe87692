"""What reaches the terminal, and the run's log file.

The terminal gets gdistill's own lines once, as plain text on stdout (``line``), its
warnings as ``gdistill: warning: ...`` on stderr, and every ERROR a library logs. The
INFO and WARNING records of the libraries (Orbax, JAX, TFDS, ...) go to the log file,
``WORKDIR/gdistill.log`` (appended to, with gdistill's lines, timestamped), and not to
the terminal, unless absl's ``--verbosity`` flag is given: ``-v 0`` puts them on the
terminal as before (absl's ``I1202 ...`` lines on stderr), ``-v -1`` only warnings.

A refused command (a bad config, the workdir of another run, a locked one) leaves its
workdir untouched, so the file opens only once the command's checks passed
(``open_log``). Until then the records wait in memory, and so do gdistill's lines when
a log will open (``setup(hold=True)``), so that ``log: PATH`` is the terminal's first
line. Cloud Storage cannot append to an object: a ``gs://`` workdir's log is a local
file (named on that first line). Without ``setup`` (the API in a notebook or a test)
nothing here changes how logging works: ``line`` prints.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import re
import sys
import tempfile
from typing import Optional

LOG_FILE = 'gdistill.log'
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_LOGGER = logging.getLogger('gdistill')  # gdistill's lines, for the log file only:
_LOGGER.propagate = False  # the terminal has them from print
_FORMAT = logging.Formatter('%(asctime)s %(levelname).1s %(filename)s:%(lineno)d] %(message)s')
_MAX_WAITING = 10_000  # records kept in memory before the log opens


def _own(record: logging.LogRecord) -> bool:
  return record.pathname.startswith(_OWN_DIR)


class _LogFile(logging.Handler):
  """Formats every record it gets into the log file, or into memory until it opens."""

  def __init__(self):
    super().__init__()
    self.setFormatter(_FORMAT)
    self.waiting = collections.deque(maxlen=_MAX_WAITING)
    self.file = None

  def emit(self, record):
    try:
      text = self.format(record)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)  # as logging's own handlers do: a bad record is no crash
      return
    if self.file is None:
      self.waiting.append(text)
      return
    try:
      self.file.write(text + '\n')
    except OSError:  # a full disk: the command reports it in one line; the log ends here
      with contextlib.suppress(OSError):
        self.file.close()
      self.file, self.waiting = None, collections.deque(maxlen=0)

  def open(self, path: str):
    with self.lock:
      self.file = open(path, 'a', buffering=1, encoding='utf-8')  # pylint: disable=consider-using-with
      self.file.writelines(t + '\n' for t in self.waiting)
      self.waiting.clear()

  def close(self):
    with self.lock:
      if self.file is not None:
        self.file.close()
    super().close()


class _OwnWarnings(logging.Handler):
  """gdistill's own logging records of WARNING and above: one plain line on stderr."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.addFilter(_own)

  def emit(self, record):
    print(f'gdistill: {record.levelname.lower()}: {record.getMessage()}', file=sys.stderr,
          flush=True)


class _TerminalFilter(logging.Filter):
  """On absl's handler (stderr): library ERRORs, or all with ``--verbosity``; gdistill's
  warnings are said by ``_OwnWarnings``."""

  def __init__(self, verbose: bool):
    super().__init__()
    self.verbose = verbose

  def filter(self, record):
    if _own(record) and record.levelno >= logging.WARNING:
      return False
    return self.verbose or record.levelno >= logging.ERROR


class _State:
  log_file: Optional[_LogFile] = None
  held: Optional[list] = None  # gdistill's lines until the log opens (setup(hold=True))
  stdout = None  # the terminal, as it was at setup


_STATE = _State()


def setup(*, hold: bool = False) -> None:
  """Sends library records below ERROR to the log file instead of the terminal (unless
  ``--verbosity`` was given); with ``hold``, gdistill's lines wait for ``open_log``.
  Called once by a command, after its flags are parsed."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  if _STATE.log_file is not None:
    return
  verbose = flags.FLAGS['verbosity'].present
  log_file = _LogFile()
  root = logging.getLogger()
  root.addHandler(log_file)
  root.addHandler(_OwnWarnings())
  absl_logging.get_absl_handler().addFilter(_TerminalFilter(verbose))
  _LOGGER.setLevel(logging.INFO)  # whatever --verbosity asks of the libraries
  _LOGGER.addHandler(log_file)
  logging.captureWarnings(True)  # Python warnings of libraries: WARNING records too
  _STATE.log_file, _STATE.stdout = log_file, sys.stdout
  _STATE.held = [] if hold else None


def log_path(workdir: str, process_index: int = 0) -> str:
  """Where ``open_log`` writes for ``workdir``: in it, or for a ``gs://`` workdir a local
  file named after it; process k > 0 of a multi-host run has a file of its own."""
  name = LOG_FILE if process_index == 0 else f'gdistill.process{process_index}.log'
  if '://' not in workdir:
    return os.path.join(workdir, name)
  return os.path.join(tempfile.gettempdir(), 'gdistill-logs',
                      re.sub(r'[^\w.-]+', '_', workdir), name)


def open_log(workdir: str, process_index: int = 0) -> None:
  """Opens the log file (once its command's checks have passed), writes what waited,
  and names it on the terminal, before the lines that were held. Nothing without
  ``setup``."""
  if _STATE.log_file is None or _STATE.log_file.file is not None:
    return
  path = log_path(workdir, process_index)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _STATE.log_file.open(path)
  shown = os.path.relpath(path)
  note = ' (a local file: Cloud Storage cannot append)' if '://' in workdir else ''
  held, _STATE.held = _STATE.held or [], None
  if process_index == 0:
    _print(f'log: {shown if not shown.startswith(os.pardir) else path}{note}')
  log_only(f'process: GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "")!r} '
           f'(gdistill.cli_setup.malloc_env)', logging.INFO)
  for text in held:
    _print(text)


def log_only(text: str, level: int = logging.ERROR) -> None:
  """A line for the log file alone (the terminal has it otherwise: why a command stopped)."""
  if _STATE.log_file is not None:
    _LOGGER.log(level, text, stacklevel=2)


def _print(text: str) -> None:
  print(text, file=_STATE.stdout or sys.stdout, flush=True)


def line(text: str) -> None:
  """One gdistill line: on the terminal once (plain text), in the log file timestamped."""
  _LOGGER.info(text, stacklevel=3)  # names the caller of metric_writer.log
  if _STATE.held is not None:
    _STATE.held.append(text)
  else:
    _print(text)


_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')  # terminal control (a progress bar's cursor moves)


class _ToLog(io.TextIOBase):
  """A text stream whose lines become INFO records of ``logger`` (a progress bar's
  redrawn line: its last state)."""

  def __init__(self, logger: logging.Logger):
    super().__init__()
    self._logger, self._part = logger, ''

  def writable(self):
    return True

  def write(self, text):
    lines = (self._part + text).split('\n')
    self._part = lines.pop()
    for l in lines:
      self._emit(l)
    return len(text)

  def _emit(self, text):
    text = _ANSI.sub('', text.rsplit('\r', 1)[-1]).strip()
    if text:
      self._logger.info(text)

  def close(self):
    self._emit(self._part)
    self._part = ''
    super().close()


@contextlib.contextmanager
def output_to_log(name: str):
  """What a library prints (TFDS preparing a dataset: its messages and progress bars)
  goes to the log file as records of logger ``name``; as it was without ``setup``."""
  if _STATE.log_file is None:
    yield
    return
  stream = _ToLog(logging.getLogger(name))
  try:
    with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
      yield
  finally:
    stream.close()
