"""The training loop against its bare step: what the loop (data, metrics, logging,
checkpoints) costs on top of the jitted step, per phase kind, on the real data.

  python benchmarks/loop.py [--config=configs/fashion_mnist.py] [--steps=50] [--rounds=2]
      [--json=loop.json]

For teacher, stage 1 and the first stage-2 halving of the config's run plan, in one
process, interleaved round by round:
  * loop: ``gdistill.loop.run_phase`` on a fresh workdir for ``--steps`` steps, with the
    config's batch, log interval and checkpointing (a finished phase's lean save
    included), reading the config's real training data; its rate is the loop's own
    (from the end of the first step to the end of the last, as its log line reports);
  * step: the same compiled update (the loop's cache) called back to back on one
    device-resident batch, waiting only at the end;
  * ``loop_over_step`` = loop rate / step rate (1.0: the loop costs nothing);
  * ``phase_seconds``: the whole ``run_phase`` call (state init, compile cache hit,
    final save), what a user waits for per phase beyond the steps.
And the input pipeline alone (``gdistill.data.global_batch`` of consecutive steps, to
device): images/s and its ratio to the loop's consumption.
The stage-1 student distils the config's teacher (the shipped one for the embedded
default); stage 2 distils the stage-1 student's initial parameters (speed does not
depend on the values). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import common  # sets the CPU device count before JAX starts; pylint: disable=g-bad-import-order

import jax  # pylint: disable=g-import-not-at-top

from gdistill import loop, run_plan, sharding, train  # pylint: disable=g-import-not-at-top
from gdistill.data import global_batch  # pylint: disable=g-import-not-at-top


class _Rates:
  """A metric writer that keeps the loop's own steps/s."""

  def __init__(self):
    self.rate = float('nan')

  def scalars(self, step, values):
    del step
    for k, v in values.items():
      if k.endswith('/steps_per_s'):
        self.rate = float(v)

  def close(self):
    pass


def _phases(run, steps):
  """(kind, loop.Phase) of teacher, stage 1 and the first halving, ``steps`` long."""
  plan, builder = run.plan, run.builder
  teacher_spec = plan['teacher']
  stage1_spec = plan['stage1']
  halving = next(p for p in plan.phases if p.kind == run_plan.STAGE2)
  teacher_params = (run.store.load('teacher').params if run.config.teacher_checkpoint
                    else None)
  teacher = builder.build(teacher_spec)
  if teacher_params is None:  # no teacher to load: its initial parameters will do
    teacher_params = loop.init_state(teacher, run.ctx).eval_params
  stage1 = builder.build(stage1_spec, teacher_params)
  student_params = loop.init_state(stage1, run.ctx).eval_params
  stage2 = builder.build(halving, student_params)
  short = lambda p: dataclasses.replace(p, num_steps=steps, on_done=None, track=None)
  return [('teacher', short(teacher)), ('stage1', short(stage1)), ('stage2', short(stage2))]


def _loop_rate(phase, run, root):
  workdir = tempfile.mkdtemp(dir=root)
  rates = _Rates()
  ctx = dataclasses.replace(run.ctx, workdir=workdir, writer=rates)
  t0 = time.perf_counter()
  loop.run_phase(phase, ctx)
  seconds = time.perf_counter() - t0
  shutil.rmtree(workdir)
  return rates.rate, seconds


def _step_rate(phase, run):
  state = loop.init_state(phase, run.ctx)
  batch = global_batch(run.source, seed=0, step=0, batch_size=phase.batch_size,
                       sharding=sharding.batch_sharding(run.mesh))
  rng = jax.device_put(loop.phase_rng(0, phase.name), sharding.replicated(run.mesh))
  update = loop.compile_step(phase, run.ctx, state, batch, rng)
  state, m = update(state, phase.frozen, batch, rng)  # first call: outside the timing
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(phase.num_steps - 1):
    state, m = update(state, phase.frozen, batch, rng)
  jax.block_until_ready((state, m))
  return (phase.num_steps - 1) / (time.perf_counter() - t0)


def _pipeline_rate(run, batch_size, steps):
  batch_sh = sharding.batch_sharding(run.mesh)
  jax.block_until_ready(global_batch(run.source, seed=0, step=0, batch_size=batch_size,
                                     sharding=batch_sh))
  t0 = time.perf_counter()
  for s in range(1, steps + 1):
    b = global_batch(run.source, seed=0, step=s, batch_size=batch_size, sharding=batch_sh)
  jax.block_until_ready(b)
  return steps * batch_size / (time.perf_counter() - t0)


def main():
  p = common.parser(__doc__.split('\n\n')[0])
  p.add_argument('--steps', type=int, default=50, help='steps per timed loop and step run')
  p.add_argument('--rounds', type=int, default=2, help='interleaved rounds (median reported)')
  p.add_argument('--kinds', default='teacher,stage1,stage2')
  args = p.parse_args()
  config, _ = common.load_config(args.config, quick=args.quick)
  root = tempfile.mkdtemp(prefix='gdistill_loop_bench_')
  try:
    run = train.Run(config, os.path.join(root, 'run'))
    kinds = args.kinds.split(',')
    phases = [(k, ph) for k, ph in _phases(run, args.steps) if k in kinds]
    for kind, phase in phases:  # compile (cached by the loop) and warm up, untimed
      _loop_rate(dataclasses.replace(phase, num_steps=3), run, root)
      print(f'{kind}: warmed up', file=sys.stderr, flush=True)
    measured = {k: {'loop': [], 'step': [], 'phase_seconds': []} for k, _ in phases}
    for r in range(args.rounds):
      for kind, phase in phases:
        rate, seconds = _loop_rate(phase, run, root)
        measured[kind]['loop'].append(rate)
        measured[kind]['phase_seconds'].append(seconds)
        measured[kind]['step'].append(_step_rate(phase, run))
        print(f'round {r}: {kind}: loop {rate:.3f} steps/s, step '
              f'{measured[kind]["step"][-1]:.3f} steps/s', file=sys.stderr, flush=True)
    records = []
    for kind, phase in phases:
      m = measured[kind]
      loop_rate, step_rate = statistics.median(m['loop']), statistics.median(m['step'])
      records.append({
          'phase': kind, 'batch_size': phase.batch_size, 'steps': args.steps,
          'loop_steps_per_s': loop_rate, 'step_steps_per_s': step_rate,
          'loop_over_step': loop_rate / step_rate,
          'loop_images_per_s': loop_rate * phase.batch_size,
          'phase_seconds': statistics.median(m['phase_seconds']),
          'rounds': {k: v for k, v in m.items()}})
    batch = max(ph.batch_size for _, ph in phases)
    pipe = _pipeline_rate(run, batch, steps=200)
    consumption = max(r['loop_images_per_s'] for r in records)
    pipeline = {'images_per_s': pipe, 'batch_size': batch,
                'over_fastest_loop': pipe / consumption, 'dataset': config.data.name,
                'image_shape': list(run.source.image_shape)}
    run.close()
    common.table(
        f'loop vs bare step ({config.data.name}, {jax.device_count()} x '
        f'{jax.devices()[0].platform}, median of {args.rounds} rounds, {args.steps} steps)',
        ['phase', 'batch', 'loop steps/s', 'step steps/s', 'loop_over_step', 'phase s'],
        [[r['phase'], r['batch_size'], f'{r["loop_steps_per_s"]:.3f}',
          f'{r["step_steps_per_s"]:.3f}', f'{r["loop_over_step"]:.3f}',
          f'{r["phase_seconds"]:.1f}'] for r in records])
    print(f'input pipeline alone: {pipe:,.0f} images/s at batch {batch} '
          f'({pipe / consumption:.0f}x the fastest loop\'s {consumption:.0f} images/s)')
    if args.json:
      with open(args.json, 'w') as f:
        json.dump({'loop': records, 'input_pipeline': pipeline}, f, indent=2)
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  main()
