"""Runs every benchmark and prints their tables; optionally writes JSON records.

  python benchmarks/run.py [--quick] [--json FILE] [--config configs/X.py]

``--quick`` uses the smoke-sized model (configs/smoke.py) and fewer
repetitions; it is compile-bound (3 train steps, 2 tiny-DiT steps and 9 sampler
compilations),
sized for about two minutes on an idle 2-core CPU. Without it,
configs/fashion_mnist.py: several minutes on a CPU, most of it the guided
teacher sampling at 2 x 256 evaluations. The same
command runs on an accelerator (the peak is then a bf16 or f32 matmul on it).

The JSON file is a list of {"name", "value", "unit"}; among them:
  teacher_step_peak_fraction         XLA flops / step time / measured matmul peak
  stage1_step_over_teacher_step      stage-1 step time / teacher step time
  stage2_step_over_teacher_step      stage-2 step time / teacher step time
  sampling_speedup_over_nfe_ratio    (time 2x256 guided teacher / time 4-step student) / 128
  sampler_compile_ratio_1024_over_4  sampler compile time at N=1024 / at N=4
  loop_over_step_{teacher,stage1,stage2}  the real loop's rate / its bare step's (loop.py)
  input_pipeline_over_loop           the Grain pipeline alone / the fastest loop's images/s
  input_pipeline_64x64x3_images_per_s_workersN  the pipeline on a 64x64x3 array_record file
  stage1_step_memory_remat_over_no_remat  XLA's bytes per device with / without remat
  dit_{teacher,stage1}_step_peak_fraction  the same steps of a DiT on the same data
                                     (dit_steps.py: --quick its tiny size, else fmnist)

The loop section (benchmarks/loop.py) trains on the config's real data: on a machine
without it, leave it out with --only=train,dit,sampling,compile.
"""

from __future__ import annotations

import functools
import time

import common  # pylint: disable=g-bad-import-order  # sets up sys.path and XLA_FLAGS first

import compile_time  # pylint: disable=g-import-not-at-top
import dit_steps  # pylint: disable=g-import-not-at-top
import loop  # pylint: disable=g-import-not-at-top
import memory  # pylint: disable=g-import-not-at-top
import sampling_speed  # pylint: disable=g-import-not-at-top
import train_steps  # pylint: disable=g-import-not-at-top

HEADLINE = ('teacher_step_peak_fraction', 'stage1_step_over_teacher_step',
            'stage2_step_over_teacher_step', 'sampling_speedup_over_nfe_ratio',
            'sampler_compile_ratio_1024_over_4', 'loop_over_step_teacher',
            'loop_over_step_stage1', 'loop_over_step_stage2', 'input_pipeline_over_loop',
            'dit_teacher_step_peak_fraction', 'dit_stage1_step_peak_fraction',
            'dit_stage1_step_over_teacher_step')


def main():
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument('--sample-batch', type=int, default=None,
                 help='images per sampler call (default: 2 per class on CPU, 64 on accelerators)')
  p.add_argument('--only', default='train,dit,sampling,compile,loop,memory',
                 help='comma-separated subset of train,dit,sampling,compile,loop,memory')
  args = p.parse_args()
  setup = common.make_setup(args)
  print(setup.describe(), flush=True)
  records = common.Records()
  only = set(args.only.split(','))
  sections = (('train', train_steps.run), ('dit', dit_steps.run), ('sampling', functools.partial(
      sampling_speed.run, batch=args.sample_batch)), ('compile', compile_time.run),
              ('loop', loop.run), ('memory', memory.run))
  t0 = time.perf_counter()
  for name, run in sections:
    if name in only:
      t = time.perf_counter()
      run(setup, records)
      records.add(f'benchmark_{name}_seconds', time.perf_counter() - t, 's')
  records.add('benchmark_wall_seconds', time.perf_counter() - t0, 's')
  print('wall: ' + ', '.join(f'{r["name"][10:-8]} {r["value"]:.0f}s' for r in records.items
                             if r['name'].startswith('benchmark_')), flush=True)
  by_name = {r['name']: r for r in records.items}
  common.table('Headline', ['name', 'value', 'unit'],
               [[n, by_name[n]['value'], by_name[n]['unit']] for n in HEADLINE if n in by_name])
  if args.json:
    records.write(args.json)


if __name__ == '__main__':
  main()
