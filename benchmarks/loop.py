"""The training loop against its bare step: what the loop (data, metrics, logging,
checkpoints) costs on top of the jitted step, per phase kind, on the real data; and
the Grain input pipeline alone.

  python benchmarks/loop.py [--config=configs/fashion_mnist.py] [--steps=50] [--rounds=2]
      [--only=loop,pipeline] [--workers=0,1,2,4] [--pipeline-examples=20000] [--json=FILE]

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
And the input pipeline alone (``gdistill.data.train_batches``: Grain, through to the
batch's sharded device arrays), in images/s from its first batch on (worker start-up
excluded), with nothing else running:
  * on the config's training data at the loop's batch and the run's worker count, and
    its ratio to the fastest loop's consumption;
  * at ImageNet 64's image size: a TFDS array_record dataset of ``--pipeline-examples``
    random 64x64x3 images, PNG-encoded as imagenet_resized/64x64 stores them, written to a
    temporary directory, read and decoded per example, for each ``--workers`` count.
The stage-1 student distils the config's teacher (the shipped one for the embedded
default); stage 2 distils the stage-1 student's initial parameters (speed does not
depend on the values). Run it on an otherwise idle machine.

``--json`` writes ``{"name", "value", "unit"}`` records, as ``run.py`` (which includes
this benchmark) does.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time

import common  # sets the CPU device count before JAX starts; pylint: disable=g-bad-import-order

import jax  # pylint: disable=g-import-not-at-top

from gdistill import data, loop, run_plan, sharding, train  # pylint: disable=g-import-not-at-top
from gdistill.data import pipeline  # pylint: disable=g-import-not-at-top
import images64  # pylint: disable=g-import-not-at-top,g-bad-import-order

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
  batch = next(data.train_batches(run.source, seed=0, batch_size=phase.batch_size,
                                  sharding=sharding.batch_sharding(run.mesh), start=0, stop=1))
  rng = jax.device_put(loop.phase_rng(0, phase.name), sharding.replicated(run.mesh))
  update = loop.compile_step(phase, run.ctx, state, batch, rng)
  state, m = update(state, phase.frozen, batch, rng)  # first call: outside the timing
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(phase.num_steps - 1):
    state, m = update(state, phase.frozen, batch, rng)
  jax.block_until_ready((state, m))
  return (phase.num_steps - 1) / (time.perf_counter() - t0)


def pipeline_rate(source, mesh, *, batch_size: int, workers: int, images: int) -> float:
  """Images/s of ``data.train_batches`` (to sharded device arrays) in steady state: the
  batches its readers hold when the first one arrives are drained before the timing."""
  ready = 1 + pipeline.PREFETCH_BATCHES * max(workers, 1)
  steps = max(2 * ready, -(-images // batch_size))
  batches = data.train_batches(source, seed=0, batch_size=batch_size,
                               sharding=sharding.batch_sharding(mesh), start=0,
                               stop=ready + steps, workers=workers)
  for _ in range(ready):
    jax.block_until_ready(next(batches))
  t0 = time.perf_counter()
  for b in batches:
    pass
  jax.block_until_ready(b)
  return steps * batch_size / (time.perf_counter() - t0)


def measure_loop(run, records, *, steps: int, rounds: int, kinds, root: str) -> list:
  """loop_over_step per phase kind (records); returns the rows of its table."""
  phases = [(k, ph) for k, ph in _phases(run, steps) if k in kinds]
  for kind, phase in phases:  # compile (cached by the loop) and warm up, untimed
    _loop_rate(dataclasses.replace(phase, num_steps=3), run, root)
    print(f'{kind}: warmed up', file=sys.stderr, flush=True)
  measured = {k: {'loop': [], 'step': [], 'phase_seconds': []} for k, _ in phases}
  for r in range(rounds):
    for kind, phase in phases:
      rate, seconds = _loop_rate(phase, run, root)
      measured[kind]['loop'].append(rate)
      measured[kind]['phase_seconds'].append(seconds)
      measured[kind]['step'].append(_step_rate(phase, run))
      print(f'round {r}: {kind}: loop {rate:.3f} steps/s, step '
            f'{measured[kind]["step"][-1]:.3f} steps/s', file=sys.stderr, flush=True)
  rows = []
  for kind, phase in phases:
    m = measured[kind]
    loop_rate, step_rate = statistics.median(m['loop']), statistics.median(m['step'])
    seconds = statistics.median(m['phase_seconds'])
    records.add(f'loop_over_step_{kind}', loop_rate / step_rate, 'ratio')
    records.add(f'loop_images_per_s_{kind}', loop_rate * phase.batch_size, 'images/s')
    records.add(f'step_images_per_s_{kind}', step_rate * phase.batch_size, 'images/s')
    records.add(f'phase_seconds_{kind}', seconds, 's')
    rows.append([kind, phase.batch_size, f'{loop_rate:.3f}', f'{step_rate:.3f}',
                 f'{loop_rate / step_rate:.3f}', f'{seconds:.1f}'])
  common.table(
      f'loop vs bare step ({run.config.data.name}, {jax.device_count()} x '
      f'{jax.devices()[0].platform}, median of {rounds} rounds, {steps} steps)',
      ['phase', 'batch', 'loop steps/s', 'step steps/s', 'loop_over_step', 'phase s'], rows)
  return rows


def measure_pipeline(run, records, *, workers, examples: int, images: int, root: str):
  """The input pipeline alone: on the run's data at its batch and worker count, and on
  a 64x64x3 array_record file per worker count (records)."""
  batch = run.config.teacher.batch_size
  rate = pipeline_rate(run.source, run.mesh, batch_size=batch, workers=run.ctx.data_workers,
                       images=images)
  records.add('input_pipeline_images_per_s', rate, 'images/s')
  loops = [r['value'] for r in records.items if r['name'].startswith('loop_images_per_s_')]
  line = (f'input pipeline alone ({run.config.data.name}, batch {batch}, '
          f'{run.ctx.data_workers} workers): {rate:,.0f} images/s')
  if loops:
    records.add('input_pipeline_over_loop', rate / max(loops), 'ratio')
    line += f' ({rate / max(loops):.0f}x the fastest loop\'s {max(loops):.0f} images/s)'
  print(line, flush=True)
  t0 = time.perf_counter()
  source = images64.source(os.path.join(root, 'tfds'), examples)
  print(f'wrote {examples} 64x64x3 PNG images as array_record in '
        f'{time.perf_counter() - t0:.0f}s', file=sys.stderr, flush=True)
  batch64 = 256
  rows = []
  for n in workers:
    rate = pipeline_rate(source, run.mesh, batch_size=batch64, workers=n, images=images)
    records.add(f'input_pipeline_64x64x3_images_per_s_workers{n}', rate, 'images/s')
    rows.append([n, f'{rate:,.0f}'])
    print(f'64x64x3, {n} workers: {rate:,.0f} images/s', file=sys.stderr, flush=True)
  common.table(f'input pipeline alone, 64x64x3 array_record ({examples} PNG images, batch '
               f'{batch64}, {common.cli_setup.usable_cores()} cores)',
               ['workers', 'images/s'], rows)


def measure(config, records, *, steps: int, rounds: int, kinds, only, workers,
            examples: int, images: int):
  root = tempfile.mkdtemp(prefix='gdistill_loop_bench_')
  try:
    run = train.Run(config, os.path.join(root, 'run'))
    try:
      if 'loop' in only:
        measure_loop(run, records, steps=steps, rounds=rounds, kinds=kinds, root=root)
      if 'pipeline' in only:
        measure_pipeline(run, records, workers=workers, examples=examples, images=images,
                         root=root)
    finally:
      run.close()
  finally:
    shutil.rmtree(root, ignore_errors=True)


def run(setup, records):
  """run.py's loop section: its config, sized down by --quick."""
  quick = setup.quick
  measure(setup.config, records, steps=5 if quick else 25, rounds=1 if quick else 2,
          kinds=('teacher', 'stage1', 'stage2'), only=('loop', 'pipeline'),
          workers=(0, 1) if quick else (0, 1, 2, 4), examples=2000 if quick else 20000,
          images=2048 if quick else 10240)


def main():
  p = common.parser(__doc__.split('\n\n')[0])
  p.add_argument('--steps', type=int, default=50, help='steps per timed loop and step run')
  p.add_argument('--rounds', type=int, default=2, help='interleaved rounds (median reported)')
  p.add_argument('--kinds', default='teacher,stage1,stage2')
  p.add_argument('--only', default='loop,pipeline', help='comma-separated subset of '
                 'loop,pipeline')
  p.add_argument('--workers', default='0,1,2,4',
                 help='Grain worker counts of the 64x64x3 pipeline record')
  p.add_argument('--pipeline-examples', type=int, default=20000,
                 help='images in the 64x64x3 array_record file')
  p.add_argument('--pipeline-images', type=int, default=10240,
                 help='images per pipeline timing')
  args = p.parse_args()
  config, _ = common.load_config(args.config, quick=args.quick)
  records = common.Records()
  measure(config, records, steps=args.steps, rounds=args.rounds,
          kinds=args.kinds.split(','), only=args.only.split(','),
          workers=[int(n) for n in args.workers.split(',')],
          examples=args.pipeline_examples, images=args.pipeline_images)
  if args.json:
    records.write(args.json)


if __name__ == '__main__':
  main()
