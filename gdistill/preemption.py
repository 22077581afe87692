"""Stopping a training phase on request: SIGTERM (what a preemptible TPU VM, or
``launch/`` stop, sends) or SIGINT (Ctrl-C).

While a phase trains, the first such signal only sets a flag; the loop finishes the
step in flight, saves a checkpoint of exactly that step, waits until it is durable
and raises ``Preempted``, which the command line turns into one line and exit status
``EXIT_PREEMPTED``. Further signals while it saves are logged and ignored, so nothing
is cut half-written. On multi-host runs all processes must save at the same step: there
the signals are left to JAX's preemption service (``jax.distributed`` installs its
SIGTERM notifier), which agrees on the step across processes
(``reached_preemption_sync_point``).
Outside training (compiling, sampling, evaluating) signals keep their default effect.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils

from gdistill.metric_writer import log

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: rerun the same command to resume


class Preempted(RuntimeError):
  """The run stopped on request after saving a checkpoint."""


def _multihost() -> bool:
  return jax.process_count() > 1


class StopRequests:
  """A context manager: while it is open, SIGTERM and SIGINT request a stop."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signal_name is None:
      self.signal_name = name
      log(f'received {name}: stopping after the step in flight, with a checkpoint of it')
    else:
      log(f'received {name} again: still saving the checkpoint, then stopping')

  def __enter__(self):
    if threading.current_thread() is threading.main_thread() and not _multihost():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}
    return False

  def reached(self, step: int) -> bool:
    """Whether to save and stop at ``step`` (call it at every step, on every process)."""
    if _multihost():
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signal_name = 'SIGTERM'
      except RuntimeError:  # jax_enable_preemption_service is off: nothing to agree on
        pass
    return self.signal_name is not None
