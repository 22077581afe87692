"""The one training loop every phase (teacher, stage 1, each halving) runs.

It owns checkpointing (resume from the latest), logging, progress, NaN checks
and the end-of-phase hook; what is trained is entirely in ``Phase``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gdistill import checkpoint, sharding, xla_options
from gdistill.data import global_batch
from gdistill.metric_writer import MetricWriter, Progress, log
from gdistill.train_state import TrainState


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
    on_done: called with the final state once the phase has finished.
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
  on_done: Optional[Callable[[TrainState], None]] = None
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
  compile_options: dict = dataclasses.field(default_factory=dict)  # xla_options.compile_options


def phase_rng(seed: int, name: str) -> jax.Array:
  """A phase's base rng: a pure function of (seed, phase name)."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _abstract_with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def build_state(phase: Phase, ctx: LoopContext, mgr) -> TrainState:
  """Restores the latest checkpoint of the phase, or initialises (born sharded)."""
  abstract = jax.eval_shape(phase.init_fn, phase.frozen)
  shardings = sharding.state_shardings(abstract, ctx.mesh, ctx.strategy)
  latest = mgr.latest_step()
  if latest is not None:
    state = checkpoint.restore(mgr, latest, _abstract_with_shardings(abstract, shardings))
    log(f'{phase.name}: resumed from step {int(state.step)}')
    return state
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


def run_phase(phase: Phase, ctx: LoopContext) -> TrainState:
  """Runs (or resumes, or just loads) a phase to ``num_steps``; returns its final state."""
  mgr = checkpoint.manager(checkpoint.phase_dir(ctx.workdir, phase.name),
                           max_to_keep=ctx.max_to_keep)
  state = build_state(phase, ctx, mgr)
  step = int(state.step)
  if step >= phase.num_steps:
    log(f'{phase.name}: already finished ({step} steps)')
    mgr.close()
    if phase.on_done is not None:
      phase.on_done(state)  # idempotent: it skips outputs that exist
    return state

  batch_sh = sharding.batch_sharding(ctx.mesh)
  rng = jax.device_put(phase_rng(ctx.seed, phase.name), sharding.replicated(ctx.mesh))
  get_batch = lambda s: global_batch(ctx.source, seed=ctx.seed, step=s,
                                     batch_size=phase.batch_size, sharding=batch_sh)
  batch = get_batch(step)
  update = compile_step(phase, ctx, state, batch, rng)
  progress = Progress(name=phase.name, start_step=step, total_steps=phase.num_steps,
                      batch_size=phase.batch_size)
  window, window_start = [], step
  while step < phase.num_steps:
    state, metrics = update(state, phase.frozen, batch, rng)
    step += 1
    if step < phase.num_steps:
      batch = get_batch(step)  # host work overlaps the device step
    # Waiting on every step's metrics bounds the dispatch queue (ENVIRONMENT.md).
    metrics = jax.device_get(metrics)
    window.append(metrics)
    if step == window_start + 1 and progress._t0 is None:
      progress.start(step)
    if not math.isfinite(float(metrics['loss'])):
      raise TrainingDiverged(f'{phase.name}: loss is {metrics["loss"]} at step {step} '
                             f'(last finite at or after step {window_start})')
    if step % ctx.log_every == 0 or step == phase.num_steps:
      mean = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
      rate = progress.rate(step)  # NaN until a step after the first (compiling) one
      ctx.writer.scalars(step, {f'{phase.name}/{k}': v for k, v in mean.items()}
                         | ({f'{phase.name}/steps_per_s': rate} if math.isfinite(rate) else {}))
      log(progress.line(step, mean))
      window, window_start = [], step
    if step % phase.checkpoint_every == 0 or step == phase.num_steps:
      checkpoint.save(mgr, step, state, phase.meta)
    if phase.track is not None and (step == phase.num_steps or (
        phase.track_every and step % phase.track_every == 0)):
      progress.exclude(track(phase, ctx, step, state))
  mgr.wait_until_finished()
  mgr.close()
  if phase.on_done is not None:
    phase.on_done(state)
  return state
