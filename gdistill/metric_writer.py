"""Scalar metrics to TensorBoard event files (tensorboardX, no TensorFlow), lines to the
user (``log``), and a progress line with rate and ETA of the phase and of the run."""

from __future__ import annotations

import math
import os
import time
from typing import Mapping, Optional, Sequence

import jax

from gdistill import console


class MetricWriter:
  """Writes on process 0 only; ``workdir/tensorboard`` holds the event files."""

  def __init__(self, workdir: str):
    self._workdir, self._tb = workdir, None

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if jax.process_index() != 0:
      return
    if self._tb is None:  # opened on first use: a run that fails early writes nothing
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(logdir=os.path.join(self._workdir, 'tensorboard'))
    for k, v in values.items():
      self._tb.add_scalar(k, float(v), global_step=step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def duration(seconds: float) -> str:
  """``12m05s``; ``1h25m`` from an hour on."""
  s = int(seconds)
  return f'{s // 3600}h{s % 3600 // 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'


class RunProgress:
  """Which phase of how many a run is in, and the ETA of its remaining steps.

  A phase's remaining steps take the time of the latest rate measured in this process
  for its group: phases of one group run at one rate (the stage-2 halvings share one
  compiled step). A group not yet measured makes the ETA ``unknown``; work besides the
  steps (evaluation, translation, in-training FID) makes it a lower bound: ``>20m``.
  """

  def __init__(self, phases: Sequence[tuple[str, str, int]], *, more_work: bool = False):
    """``phases``: (name, group, num_steps) of the phases the run trains, in order."""
    self.phases, self.more_work = list(phases), more_work
    self._rates = {}

  def tag(self, name: str) -> str:
    return f'[{self._index(name) + 1}/{len(self.phases)}]'

  def eta(self, name: str, step: int, rate: float) -> str:
    """The run's ETA, ``rate`` (steps/s, NaN: unknown) being phase ``name``'s now."""
    i = self._index(name)
    if math.isfinite(rate):
      self._rates[self.phases[i][1]] = rate
    seconds = 0.0
    for j, (_, group, num_steps) in enumerate(self.phases[i:]):
      if group not in self._rates:
        return 'run ETA unknown'
      seconds += (num_steps - step if j == 0 else num_steps) / self._rates[group]
    return f'run ETA {">" if self.more_work else ""}{duration(seconds)}'

  def _index(self, name: str) -> int:
    return [p[0] for p in self.phases].index(name)

  def __contains__(self, name: str) -> bool:
    return any(p[0] == name for p in self.phases)


class Progress:
  """A phase's progress line: step, metrics, rate (steps/s) and ETA, over the steps run
  in this process; with ``run``, which phase of the run's it is and the run's ETA."""

  def __init__(self, *, name: str, start_step: int, total_steps: int,
               run: Optional[RunProgress] = None):
    self.name, self.total = name, total_steps
    self.run = run if run is not None and name in run else None
    self._t0, self._s0 = None, start_step

  def start(self, step: int) -> None:
    """Called after the first (compiling) step, so compile time is not in the rate."""
    self._t0, self._s0 = time.perf_counter(), step

  @property
  def started(self) -> bool:
    return self._t0 is not None

  def exclude(self, seconds: float) -> None:
    """Leaves ``seconds`` of other work (in-training evaluation) out of the rate."""
    if self._t0 is not None:
      self._t0 += seconds

  def line(self, step: int, metrics: Mapping[str, float]) -> str:
    parts = [self.run.tag(self.name)] if self.run else []
    parts += [f'{self.name} {step}/{self.total}']
    parts += [f'{k}={v:.4g}' for k, v in metrics.items()]
    rate = self.rate(step)
    if math.isfinite(rate):
      parts += [f'{rate:.2f} steps/s', f'ETA {duration((self.total - step) / rate)}']
    line = ' '.join(parts)
    return f'{line}, {self.run.eta(self.name, step, rate)}' if self.run else line

  def rate(self, step: int) -> float:
    if self._t0 is None or step <= self._s0:
      return float('nan')
    return (step - self._s0) / (time.perf_counter() - self._t0)


def log(msg: str) -> None:
  """A line to the user (process 0): ``console.line``."""
  if jax.process_index() == 0:
    console.line(msg)
