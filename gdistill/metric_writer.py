"""Scalar metrics to TensorBoard event files (tensorboardX, no TensorFlow) and
the console, and a progress line with rate and ETA."""

from __future__ import annotations

import os
import time
from typing import Mapping

import jax
from absl import logging


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


class Progress:
  """Rate (steps/s, images/s) and ETA over the steps run in this process."""

  def __init__(self, *, name: str, start_step: int, total_steps: int, batch_size: int):
    self.name, self.total, self.batch = name, total_steps, batch_size
    self._t0, self._s0 = None, start_step

  def start(self, step: int) -> None:
    """Called after the first (compiling) step, so compile time is not in the rate."""
    self._t0, self._s0 = time.perf_counter(), step

  def exclude(self, seconds: float) -> None:
    """Leaves ``seconds`` of other work (in-training evaluation) out of the rate."""
    if self._t0 is not None:
      self._t0 += seconds

  def line(self, step: int, metrics: Mapping[str, float]) -> str:
    parts = [f'{self.name} {step}/{self.total}']
    parts += [f'{k}={v:.4g}' for k, v in metrics.items()]
    if self._t0 is not None and step > self._s0:
      dt = time.perf_counter() - self._t0
      rate = (step - self._s0) / dt
      eta = (self.total - step) / rate
      parts += [f'{rate:.2f} steps/s', f'{rate * self.batch:.0f} img/s',
                f'ETA {int(eta // 60)}m{int(eta % 60):02d}s']
    return '  '.join(parts)

  def rate(self, step: int) -> float:
    if self._t0 is None or step <= self._s0:
      return float('nan')
    return (step - self._s0) / (time.perf_counter() - self._t0)


def log(msg: str) -> None:
  if jax.process_index() == 0:
    logging.info(msg)
    print(msg, flush=True)
