"""The one training loop every phase (teacher, stage 1, each halving) runs.

It owns checkpointing (resume from the latest), logging, progress, NaN checks
and the end-of-phase hook; what is trained is entirely in ``Phase``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import zlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gdistill import checkpoint, preemption, sharding, storage, xla_options
from gdistill.data import train_batches
from gdistill.metric_writer import MetricWriter, Progress, RunProgress, log
from gdistill.train_state import TrainState


# Steps in flight before the loop waits on the oldest (benchmarks/loop.py measured it).
DISPATCH_DEPTH = 2


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite."""


@dataclasses.dataclass
class Phase:
  """One training run of the loop.

  Attributes:
    name: directory name under workdir/checkpoints, e.g. ``stage2_n0004``.
    num_steps: total updates of the phase.
    batch_size: global batch size.
    init_fn: ``init_fn(frozen) -> TrainState`` (jitted with the state's shardings).
    update_fn: pure ``(state, frozen, batch, rng) -> (state, metrics)``.
    frozen: the phase's frozen inputs, given to init_fn and update_fn: what it reads
      but never trains (its teacher's parameters, the student's step count; may be empty).
    meta: JSON saved with each checkpoint (what the network is).
    on_done: called with the final sampling parameters once the phase has finished.
    track: ``track(state) -> {name: value}``, quality scores of the state's sampling
      parameters (``gdistill.eval.quick_fid``), logged every ``track_every`` steps
      (0: never during the phase) and at its end.
  """
  name: str
  num_steps: int
  batch_size: int
  init_fn: Callable[[Any], TrainState]
  update_fn: Callable
  frozen: Any
  meta: dict
  checkpoint_every: int
  on_done: Optional[Callable[[Any], None]] = None
  track: Optional[Callable[[TrainState], dict]] = None
  track_every: int = 0


@dataclasses.dataclass
class LoopContext:
  """What all phases of one run share."""
  workdir: str
  mesh: jax.sharding.Mesh
  source: Any
  seed: int
  strategy: str
  writer: MetricWriter
  log_every: int
  max_to_keep: int = 2
  keep_train_state: bool = False  # a finished phase keeps its optimiser state too
  dispatch_depth: int = DISPATCH_DEPTH
  data_workers: int = 0  # Grain worker processes reading the batches (0: this process)
  compile_options: dict = dataclasses.field(default_factory=dict)  # xla_options.compile_options
  run: Optional[RunProgress] = None  # the run's phases, for "[2/8] stage1 ... run ETA" lines


def phase_rng(seed: int, name: str) -> jax.Array:
  """A phase's base rng: a pure function of (seed, phase name)."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _abstract_with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _abstract_state(phase: Phase, ctx: LoopContext):
  """The phase's train state as abstract arrays carrying their shardings."""
  abstract = jax.eval_shape(phase.init_fn, phase.frozen)
  return _abstract_with_shardings(abstract,
                                  sharding.state_shardings(abstract, ctx.mesh, ctx.strategy))


def latest_state(phase: Phase, ctx: LoopContext, mgr):
  """``(step, what)`` of the phase's newest readable checkpoint (broken newer ones are set
  aside with a warning): ``what`` is the sampling parameters when that step finished the
  phase, else the train state to resume (``(None, None)``: no checkpoint yet)."""
  abstract = _abstract_state(phase, ctx)
  directory = checkpoint.phase_dir(ctx.workdir, phase.name)
  which = 'ema_params' if abstract.ema_params is not None else 'params'

  def load(step):
    if step >= phase.num_steps:
      return checkpoint.load_eval_params(directory, getattr(abstract, which), step=step)[0]
    if checkpoint.read_meta(directory, step).get('lean'):
      raise checkpoint.CheckpointError(
          f'{phase.name}: finished at step {step} keeping only its sampling parameters '
          f'({directory}), so it cannot be trained to num_steps={phase.num_steps}: train '
          f'longer in a new workdir, with --config.checkpoint.keep_train_state=True')
    return checkpoint.restore(mgr, step, abstract)

  step, what = checkpoint.newest_readable(directory, load, mgr.all_steps(), set_aside=True)
  mgr.reload()
  return step, what


def init_state(phase: Phase, ctx: LoopContext) -> TrainState:
  """The phase's initial state, born sharded."""
  shardings = jax.tree.map(lambda a: a.sharding, _abstract_state(phase, ctx))
  return jax.jit(phase.init_fn, out_shardings=shardings)(phase.frozen)


_COMPILED = {}


def _signature(*trees):
  leaves, treedef = jax.tree.flatten(trees)
  return treedef, tuple((l.shape, l.dtype, getattr(l, 'sharding', None)) for l in leaves)


def compile_step(phase: Phase, ctx: LoopContext, state: TrainState, batch, rng):
  """AOT-compiles the update function with donation; logs the compile time.

  Phases that share an update function and argument signature (the halvings
  of stage 2) share one compilation.
  """
  key = (phase.update_fn, _signature(state, phase.frozen, batch, rng),
         tuple(sorted(ctx.compile_options.items())))
  if key in _COMPILED:
    return _COMPILED[key]
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  repl = sharding.replicated(ctx.mesh)
  frozen_sh = jax.tree.map(lambda x: x.sharding if isinstance(x, jax.Array) else repl,
                            phase.frozen)
  batch_sh = jax.tree.map(lambda x: x.sharding, batch)
  jitted = jax.jit(phase.update_fn, in_shardings=(state_sh, frozen_sh, batch_sh, repl),
                   out_shardings=(state_sh, repl), donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = xla_options.compile(jitted.lower(state, phase.frozen, batch, rng),
                                 ctx.compile_options)
  log(f'{phase.name}: compiled train step in {time.perf_counter() - t0:.1f}s')
  _COMPILED[key] = compiled
  return compiled


def track(phase: Phase, ctx: LoopContext, step: int, state: TrainState) -> float:
  """Scores the state's sampling parameters; to TensorBoard (PHASE/quick_NAME) and the
  log. Returns the seconds it took."""
  t0 = time.perf_counter()
  scores = phase.track(state)
  ctx.writer.scalars(step, {f'{phase.name}/quick_{k}': v for k, v in scores.items()})
  shown = '  '.join(f'{k}={v:.4g}' for k, v in scores.items() if not k.endswith('seconds'))
  seconds = time.perf_counter() - t0
  log(f'{phase.name} {step}: {shown}  ({seconds:.0f}s)')
  return seconds


class _Metrics:
  """The steps' metrics: left on device as the steps are dispatched, fetched to the host
  in one transfer per window (a log line, a checkpoint, the end) and checked there.

  ``bound`` keeps at most ``depth`` steps in flight without fetching anything: before
  step k is dispatched, step k - depth has finished (ENVIRONMENT.md: an unbounded
  queue of CPU steps can hang).
  """

  def __init__(self, phase: Phase, step: int, depth: int):
    self.phase, self.depth = phase, depth
    self.pending = []  # [(step, device metrics)] not yet on the host
    self.window = []  # host metrics since the last log line
    self.checked = step  # every step up to here has finite metrics

  def add(self, step: int, metrics) -> None:
    self.pending.append((step, metrics))

  def bound(self) -> None:
    unchecked = len(self.pending)
    if unchecked > self.depth:
      jax.block_until_ready(self.pending[unchecked - 1 - self.depth][1])

  def fetch(self) -> None:
    """Brings the pending metrics to the host; raises TrainingDiverged at the first
    step whose loss or gradient norm is not finite (before anything of it is saved)."""
    if not self.pending:
      return
    steps = [s for s, _ in self.pending]
    host = jax.device_get([m for _, m in self.pending])
    self.pending = []
    for step, m in zip(steps, host):
      bad = {k: float(m[k]) for k in ('loss', 'grad_norm')
             if k in m and not math.isfinite(float(m[k]))}
      if bad:
        shown = ', '.join(f'{k}={v}' for k, v in bad.items())
        raise TrainingDiverged(
            f'{self.phase.name}: {shown} at step {step} (finite up to step {self.checked}; '
            f'nothing after it was saved): lower the learning rate or check the data')
      self.checked = step
      self.window.append(m)

  def mean(self) -> dict:
    out = {k: float(np.mean([m[k] for m in self.window])) for k in self.window[0]}
    self.window = []
    return out


COST_FILE = 'train_cost.json'


class TrainCost:
  """Each phase's training cost in ``WORKDIR/train_cost.json``: {phase: {steps,
  images, seconds}}, written with each checkpoint (process 0). ``seconds`` is the wall
  time of its steps (compilation, data and checkpoints included, in-training evaluation
  not), summed over the invocations that trained it up to the step saved; what the
  report puts beside each method's rows."""

  def __init__(self, workdir: str, phase: Phase, step: int):
    self.path = os.path.join(workdir, COST_FILE)
    self.phase, self.t0, self.excluded = phase, time.perf_counter(), 0.0
    # Read once: the workdir's lock makes this run its only writer.
    self.costs = read_costs(workdir)
    self.before = float(self.costs.get(phase.name, {}).get('seconds', 0.0)) if step else 0.0

  def exclude(self, seconds: float) -> None:
    self.excluded += seconds

  def record(self, step: int) -> None:
    if jax.process_index() != 0:
      return
    costs = self.costs
    seconds = self.before + time.perf_counter() - self.t0 - self.excluded
    costs[self.phase.name] = {'steps': int(step), 'batch_size': int(self.phase.batch_size),
                              'images': int(step) * int(self.phase.batch_size),
                              'seconds': round(seconds, 1)}
    storage.write_text(self.path, json.dumps(costs, indent=1, sort_keys=True) + '\n')


def read_costs(workdir: str) -> dict:
  """``WORKDIR/train_cost.json`` ({} if absent or unreadable)."""
  path = os.path.join(workdir, COST_FILE)
  try:
    return json.loads(storage.read_text(path)) if storage.exists(path) else {}
  except (OSError, ValueError):
    return {}


def run_phase(phase: Phase, ctx: LoopContext):
  """Runs (or resumes, or just loads) a phase to ``num_steps``; returns its final
  sampling parameters (the EMA if kept).

  A SIGTERM or SIGINT from its start to its end stops it cleanly (``preemption``):
  during the steps, with a checkpoint of the step reached; before or after them, once
  what is being saved is durable.
  """
  with preemption.StopRequests() as stop:
    params = _run_phase(phase, ctx, stop)
    if stop.signal_name is not None:  # arrived after the last step: all is saved
      raise preemption.Preempted(f'{phase.name}: stopped by {stop.signal_name} after its '
                                 f'last step ({phase.num_steps}, saved): rerun the same '
                                 f'command to continue')
  return params


def _run_phase(phase: Phase, ctx: LoopContext, stop: preemption.StopRequests):
  mgr = checkpoint.manager(checkpoint.phase_dir(ctx.workdir, phase.name),
                           max_to_keep=ctx.max_to_keep)
  try:
    step, what = latest_state(phase, ctx, mgr)
    if step is not None and step >= phase.num_steps:
      if checkpoint.read_meta(mgr.directory, step).get('lean'):
        checkpoint.delete_other_steps(mgr, step)  # a run stopped while it was pruning
      log(f'{phase.name}: already finished ({step} steps)')
      params = what
    else:
      if step is None:
        state = init_state(phase, ctx)
      else:
        state = what
        log(f'{phase.name}: resumed from step {step}')
      params = _train(phase, ctx, mgr, stop, state).eval_params
  finally:  # an error (divergence, a full disk) still lets the saves before it finish
    mgr.wait_until_finished()
    mgr.close()
  if phase.on_done is not None:
    phase.on_done(params)  # idempotent: it skips outputs that exist
  return params


def _train(phase: Phase, ctx: LoopContext, mgr, stop: preemption.StopRequests,
           state: TrainState) -> TrainState:
  """The steps from ``state`` to the phase's end; its final state.

  Raises ``preemption.Preempted`` after saving the step reached when a stop was
  requested (SIGTERM, SIGINT), ``TrainingDiverged`` before saving anything non-finite.
  """
  step = int(state.step)
  batch_sh = sharding.batch_sharding(ctx.mesh)
  rng = jax.device_put(phase_rng(ctx.seed, phase.name), sharding.replicated(ctx.mesh))
  # The data position is the step: resumed at ``step``, the batches are those of an
  # uninterrupted run (gdistill.data.pipeline).
  batches = train_batches(ctx.source, seed=ctx.seed, batch_size=phase.batch_size,
                          sharding=batch_sh, start=step, stop=phase.num_steps,
                          workers=ctx.data_workers)
  batch = next(batches)
  update = compile_step(phase, ctx, state, batch, rng)
  progress = Progress(name=phase.name, start_step=step, total_steps=phase.num_steps,
                      run=ctx.run)
  cost = TrainCost(ctx.workdir, phase, step)
  metrics = _Metrics(phase, step, ctx.dispatch_depth)
  while step < phase.num_steps:
    metrics.bound()
    state, step_metrics = update(state, phase.frozen, batch, rng)
    step += 1
    metrics.add(step, step_metrics)
    last = step == phase.num_steps
    if not last:
      batch = next(batches)  # placed on the devices while the steps in flight run
    if not progress.started:  # the rate counts from the end of the first step
      jax.block_until_ready(step_metrics)
      progress.start(step)
    if step % ctx.log_every == 0 or last:
      metrics.fetch()
      mean = metrics.mean()
      rate = progress.rate(step)  # NaN until a step after the first (compiling) one
      ctx.writer.scalars(step, {f'{phase.name}/{k}': v for k, v in mean.items()}
                         | ({f'{phase.name}/steps_per_s': rate} if math.isfinite(rate)
                            else {}))
      log(progress.line(step, mean))
    stopping = not last and stop.reached(step)
    if last:
      checkpoint.save_final(mgr, step, state, phase.meta,
                            keep_train_state=ctx.keep_train_state)
      cost.record(step)
    elif step % phase.checkpoint_every == 0 or stopping:
      metrics.fetch()  # never a checkpoint of non-finite parameters
      checkpoint.save(mgr, step, state, phase.meta)
      cost.record(step)
    if stopping:
      mgr.wait_until_finished()
      raise preemption.Preempted(
          f'{phase.name}: stopped by {stop.signal_name} at step {step} of '
          f'{phase.num_steps}; its checkpoint is saved: rerun the same command to resume')
    if phase.track is not None and (last or (
        phase.track_every and step % phase.track_every == 0)):
      seconds = track(phase, ctx, step, state)
      progress.exclude(seconds)
      cost.exclude(seconds)
  batches.close()
  return state
