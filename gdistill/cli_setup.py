"""Process set-up shared by the command-line entry points.

Imported first by each ``__main__`` module: on a CPU-only machine XLA's
convolutions barely use a second core, while one host device per core with the
batch split across them was measured 1.3-1.5x faster (ENVIRONMENT.md). So,
unless the user set it, we ask XLA for one CPU device per core (at most 8). On
machines with accelerators the CPU devices are unused, so this is harmless.
"""

from __future__ import annotations

import contextlib
import os
import sys

ENV_CPU_DEVICES = 'GDISTILL_CPU_DEVICES'


def _configure_cpu_devices():
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_force_host_platform_device_count' in flags:
    return
  n = os.environ.get(ENV_CPU_DEVICES) or str(min(os.cpu_count() or 1, 8))
  os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={n}'.strip()


_configure_cpu_devices()


def fail(message: str, code: int = 2):
  """Prints one line to stderr and exits non-zero."""
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


@contextlib.contextmanager
def user_errors():
  """Turns the errors a user can cause into one-line messages and exit code 2."""
  from gdistill.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from gdistill.config_validation import ConfigError
  from gdistill.data import DataError
  from gdistill.workdir import WorkdirError
  try:
    yield
  except (ConfigError, DataError, CheckpointError, WorkdirError) as e:
    fail(str(e))


def maybe_initialize_distributed(config) -> None:
  """Multi-host start-up: jax.distributed on request or on a Cloud TPU pod."""
  import jax  # pylint: disable=g-import-not-at-top
  on_tpu_pod = bool(os.environ.get('TPU_WORKER_HOSTNAMES', '').count(','))
  if config.multihost or on_tpu_pod:
    jax.distributed.initialize()
