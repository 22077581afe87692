"""Process set-up shared by the command-line entry points.

Imported first by each ``__main__`` module: on a CPU-only machine XLA's
convolutions barely use a second core, while one host device per core with the
batch split across them was measured 1.3-1.5x faster (ENVIRONMENT.md;
``benchmarks/cpu_devices.py`` measures it again). So, unless the user set it
(``GDISTILL_CPU_DEVICES=n``, or the XLA flag itself), we ask XLA for one CPU
device per usable core (``taskset``/cpuset aware, at most 8). On machines with
accelerators the CPU devices are unused, so this is harmless. A gdistill command
(``python -m gdistill.X``) also re-runs itself once with glibc's malloc mapping large
blocks on huge pages (``malloc_env``: the CPU's training steps 1.2x faster).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys

ENV_CPU_DEVICES = 'GDISTILL_CPU_DEVICES'


def usable_cores() -> int:
  """Cores this process may run on (taskset / cpuset aware), else os.cpu_count()."""
  try:
    return len(os.sched_getaffinity(0)) or 1
  except (AttributeError, OSError):  # not on Linux
    return os.cpu_count() or 1


def _configure_cpu_devices():
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_force_host_platform_device_count' in flags:
    return
  n = os.environ.get(ENV_CPU_DEVICES) or str(min(usable_cores(), 8))
  os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={n}'.strip()


_configure_cpu_devices()

ENV_MALLOC = 'GDISTILL_MALLOC'  # '0': leave glibc's malloc as the environment has it
_HUGETLB = 'glibc.malloc.hugetlb=1'


def malloc_env(environ=None, *, glibc: str = '', thp: str = ''):
  """The environment to re-run this process in, or None to run as is.

  XLA on the CPU allocates each step's temporaries afresh (the stage-1 step of the
  embedded default: 328 MB), and glibc's malloc serves blocks that large with a fresh
  mmap each time, so the kernel zeroes and maps them again page by page: 175,000 page
  faults and 0.47 s of system time per stage-1 step, 1.33 s/step against 1.09 with
  transparent huge pages for malloc's mappings (glibc 2.35+'s tunable
  glibc.malloc.hugetlb=1; tcmalloc and jemalloc measured the same, 1.08 and 1.09).
  Tunables are read when the process starts, hence the re-run. Skipped where it cannot
  apply (not glibc 2.35+, huge pages off) or the user set it or turned it off.
  """
  environ = os.environ if environ is None else environ
  glibc = glibc or (os.confstr('CS_GNU_LIBC_VERSION') if hasattr(os, 'confstr') else '') or ''
  if thp == '':
    try:
      with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
        thp = f.read()
    except OSError:
      thp = '[never]'
  tunables = environ.get('GLIBC_TUNABLES', '')
  version = tuple(int(v) for v in re.findall(r'\d+', glibc)[:2])
  if (environ.get(ENV_MALLOC) == '0' or 'glibc.malloc.hugetlb' in tunables or
      not glibc.startswith('glibc') or version < (2, 35) or '[never]' in thp):
    return None
  return dict(environ, GLIBC_TUNABLES=':'.join(t for t in (tunables, _HUGETLB) if t))


def rerun_with_fast_malloc():
  """Re-runs the command (same interpreter, same arguments) with ``malloc_env``'s
  tunable, when it applies; nothing has run yet (called before JAX is imported)."""
  env = malloc_env()
  if env is None or not getattr(sys, 'orig_argv', None):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError:  # cannot re-run: the slower malloc is still correct
    pass


def _is_gdistill_command() -> bool:
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  return spec is not None and (spec.name or '').startswith('gdistill.')


if _is_gdistill_command():
  rerun_with_fast_malloc()


def fail(message: str, code: int = 2):
  """Prints one line to stderr (and the log file, if open) and exits non-zero."""
  from gdistill import console  # pylint: disable=g-import-not-at-top
  console.log_only(f'gdistill: error: {message}')
  print(f'gdistill: error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(argv):
  """absl flag parsing whose config errors are one line, not a traceback."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0] if str(e) else repr(e))
  except (KeyError, AttributeError, ValueError, TypeError) as e:
    msg = str(e).strip('"\'')
    fail(f'bad --config override: {msg} (check the key against the config file)')
  except FileNotFoundError as e:
    fail(f'config file not found: {e.filename}')
  except OSError as e:  # ml_collections wraps a missing or broken config file so
    _config_file_error(e)


def _config_file_error(error: Exception):
  given = [a.split('=', 1)[1] for a in sys.argv if a.startswith('--config=')]
  path = given[-1].split(':', 1)[0] if given else '?'
  reason = 'not found' if given and not os.path.isfile(path) else f'not loadable ({error})'
  fail(f'--config={path}: config file {reason}; expected a Python file with get_config(), '
       f'e.g. configs/fashion_mnist.py')


def config_value(config_flag):
  """The config of a ``DEFINE_config_file`` flag, loaded now: a missing or broken file is
  one line (ml_collections loads it on first use, with an OSError traceback)."""
  try:
    config = config_flag.value
    if config is not None:
      config.keys()
    return config
  except OSError as e:
    _config_file_error(e)


class _BackgroundWriteFailures(logging.Filter):
  """Keeps a failed background write (Orbax's save threads, asyncio futures left at exit)
  to one log line without its traceback: the command reports it in one line itself."""

  def filter(self, record):
    if record.exc_info and record.exc_info[1] is not None and \
        write_failure(record.exc_info[1]) is not None:
      if record.name == 'asyncio':
        return False  # "Future exception was never retrieved": already reported
      record.exc_info, record.exc_text = None, None
      record.msg = str(record.msg).splitlines()[0] if record.msg else record.msg
    return True


def _is_closed_loop_callback(unraisable) -> bool:
  """TensorStore completing a write future after Orbax closed the save's event loop
  (it closes it when a write fails, e.g. a full disk): raised in asyncio's
  ``call_soon_threadsafe`` called from C, so every frame is asyncio's. The failure
  that closed the loop is what the command reports."""
  exc, tb = unraisable.exc_value, unraisable.exc_traceback
  if type(exc) is not RuntimeError or str(exc) != 'Event loop is closed' or tb is None:  # pylint: disable=unidiomatic-typecheck
    return False
  frames = []
  while tb is not None:
    frames.append(tb.tb_frame.f_code)
    tb = tb.tb_next
  return (frames[0].co_name == 'call_soon_threadsafe' and
          all(os.sep + 'asyncio' + os.sep in code.co_filename for code in frames))


def _is_abandoned_orbax_read(unraisable) -> bool:
  """Orbax restores every array's shards concurrently; when one read fails (a truncated
  or corrupt checkpoint file) the other reads are closed unfinished, and Orbax's wrapper
  around each read turns the GeneratorExit of closing it into an exception that Python
  can only print (one traceback per array). The read that failed is what the loop
  reports, and falls back from (loop.latest_state)."""
  code = getattr(unraisable.object, 'cr_code', None)  # a coroutine's
  return (code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename
          and isinstance(getattr(unraisable.exc_value, '__cause__', None), GeneratorExit))


def _quiet_closed_loop_callbacks():
  """TensorStore reports exceptions of its Python callbacks through
  ``sys.unraisablehook``, printed as bare tracebacks (one per pending write: hundreds
  on a full disk); those of a closed event loop are dropped, and so are Orbax's reads
  abandoned after another read failed; every other one is reported as before."""
  previous = sys.unraisablehook
  if getattr(previous, 'gdistill_quiet', False):
    return

  def hook(unraisable):
    if not (_is_closed_loop_callback(unraisable) or _is_abandoned_orbax_read(unraisable)):
      previous(unraisable)

  hook.gdistill_quiet = True
  sys.unraisablehook = hook


def _quiet_background_write_failures():
  for name in ('absl', 'asyncio'):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _BackgroundWriteFailures) for f in logger.filters):
      logger.addFilter(_BackgroundWriteFailures())
  _quiet_closed_loop_callbacks()


@contextlib.contextmanager
def user_errors():
  """Turns the errors a user can cause into one-line messages and exit code 2."""
  from gdistill import console  # pylint: disable=g-import-not-at-top
  from gdistill.checkpoint import CheckpointError
  from gdistill.config_validation import ConfigError
  from gdistill.data import DataError
  from gdistill.loop import TrainingDiverged
  from gdistill.preemption import EXIT_PREEMPTED, Preempted
  from gdistill.storage import StorageError
  from gdistill.workdir import WorkdirError
  _quiet_background_write_failures()
  try:
    yield
  except (ConfigError, DataError, CheckpointError, WorkdirError, StorageError,
          TrainingDiverged) as e:
    fail(str(e))
  except Preempted as e:  # not an error: the run resumes from its checkpoint
    console.log_only(f'gdistill: {e}', logging.WARNING)
    print(f'gdistill: {e}', file=sys.stderr, flush=True)
    sys.exit(EXIT_PREEMPTED)
  except Exception as e:  # pylint: disable=broad-except
    reason = write_failure(e)
    if reason is None:
      raise
    fail(f'cannot write: {reason}; what was saved before is intact: free space there (or '
         f'make it writable) and rerun the same command')


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                 errno.ENOTDIR, errno.EISDIR)
_WRITE_MARKERS = ('No space left on device', 'Disk quota exceeded', 'Read-only file system',
                  'Permission denied', 'Not a directory')


def write_failure(error: BaseException):
  """A one-line reason when ``error`` (or what caused it) is a failed write to the disk
  (full, read-only, not permitted, a file where a directory should be), else None.
  Orbax and TensorStore report such failures in their own exception types; the OS
  error's text is in their message."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
      return f'{error.strerror}: {error.filename}' if error.filename else error.strerror
    text = str(error)
    for marker in _WRITE_MARKERS:
      if marker in text:
        line = next(l for l in text.splitlines() if marker in l).strip()
        return line if len(line) <= 400 else f'{line[:300]} ... {marker}'  # keep the cause
    error = error.__cause__ or error.__context__
  return None


ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'
ENV_CPU_COLLECTIVES = 'JAX_CPU_COLLECTIVES_IMPLEMENTATION'


def distributed_kwargs(environ=None) -> dict:
  """``jax.distributed.initialize`` arguments from the environment.

  ``launch/gpu.py`` starts one process per host with JAX_COORDINATOR_ADDRESS
  (``host:port``), JAX_NUM_PROCESSES and JAX_PROCESS_ID; JAX itself reads only
  the first, so all three are passed on. Where none is set the dict is empty
  and JAX detects the cluster (Cloud TPU pods, SLURM, Open MPI) by itself.
  Inconsistent values are one-line errors naming the variable.
  """
  env = os.environ if environ is None else environ
  kwargs = {}
  if env.get(ENV_COORDINATOR):
    kwargs['coordinator_address'] = env[ENV_COORDINATOR]
  for key, arg in ((ENV_NUM_PROCESSES, 'num_processes'), (ENV_PROCESS_ID, 'process_id')):
    value = env.get(key, '')
    if value:
      try:
        kwargs[arg] = int(value)
      except ValueError:
        fail(f'{key}={value!r}: expected an integer')
  n, i = kwargs.get('num_processes'), kwargs.get('process_id')
  if n is not None and n < 1:
    fail(f'{ENV_NUM_PROCESSES}={n}: expected at least 1')
  if (n is None) != (i is None):
    have, missing = ((ENV_NUM_PROCESSES, ENV_PROCESS_ID) if i is None
                     else (ENV_PROCESS_ID, ENV_NUM_PROCESSES))
    fail(f'{have} is set but {missing} is not: set both (and {ENV_COORDINATOR})')
  if n is not None and not 0 <= i < n:
    fail(f'{ENV_PROCESS_ID}={i}: expected 0 <= {ENV_PROCESS_ID} < {ENV_NUM_PROCESSES}={n}')
  if n is not None and n > 1 and 'coordinator_address' not in kwargs:
    fail(f'{ENV_NUM_PROCESSES}={n} but {ENV_COORDINATOR} is not set: expected host:port of '
         f'process 0')
  return kwargs


def maybe_initialize_distributed(config, environ=None) -> bool:
  """Multi-host start-up; returns whether ``jax.distributed`` was initialised.

  It is, when ``config.multihost`` is true, on a Cloud TPU pod slice, or when
  the environment asks for several processes (JAX_NUM_PROCESSES > 1). CPU
  processes exchange collectives over gloo (TCP), unless
  JAX_CPU_COLLECTIVES_IMPLEMENTATION chose otherwise: that is what lets
  several processes on one machine stand in for a pod in tests. The option
  only concerns the CPU client, so it is harmless on GPU and TPU hosts.
  Must run before anything touches a JAX backend.
  """
  env = os.environ if environ is None else environ
  kwargs = distributed_kwargs(env)
  on_tpu_pod = bool(env.get('TPU_WORKER_HOSTNAMES', '').count(','))
  if not (config.multihost or on_tpu_pod or kwargs.get('num_processes', 1) > 1):
    return False
  import jax  # pylint: disable=g-import-not-at-top
  if not env.get(ENV_CPU_COLLECTIVES):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)
  return True

