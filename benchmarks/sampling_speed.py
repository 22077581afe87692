"""Sampling speed: the guided teacher at 2 x N evaluations against the
distilled student at 1/2/4/8 steps, on the same batch.

For each sampler: images/s, network evaluations (NFE) per image, and the
student's wall-clock speed-up over the guided teacher at 2 x 256 next to the
ratio of their NFE (speed-up / NFE ratio = 1 means the step count is all that
matters). Samplers are gdistill.compiled_samplers' (DDIM, step count a
traced argument, so each network compiles once for every N).

  python benchmarks/sampling_speed.py [--quick] [--config configs/X.py] [--json FILE]
"""

from __future__ import annotations

import common  # pylint: disable=g-bad-import-order  # sets up sys.path and XLA_FLAGS first

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from gdistill import compiled_samplers, sharding  # pylint: disable=g-import-not-at-top
from gdistill.denoiser import for_gdistill_net  # pylint: disable=g-import-not-at-top

TEACHER_STEPS = (64, 256)
STUDENT_STEPS = (1, 2, 4, 8)
REFERENCE_TEACHER_STEPS = 256
REFERENCE_STUDENT_STEPS = 4


def sample_batch_size(setup: common.Setup, requested=None) -> int:
  """Default: on a CPU four images per class (two with --quick), on an
  accelerator 64 per class; a multiple of the device count.

  The ratio to the NFE ratio compares a student call on B images with a guided
  teacher call on 2B: where B is too small to fill the machine, the student's
  calls are less efficient per image. On the 2-core CPU (gdistill's CPU
  options) B=20 read 0.946-0.983, B=40 0.998-1.013 (YNNPACK for reductions
  only: 0.942 at B=40); gdistill itself samples 80 (grids) and 200
  (evaluation) at a time there. Larger B takes minutes for the 2 x 256 teacher on a CPU. On
  an accelerator small batches are latency-bound."""
  n = setup.mesh.size
  if jax.devices()[0].platform == 'cpu':
    per_class = 2 if setup.quick else 4
  else:
    per_class = 64
  b = requested or per_class * setup.num_classes
  return -(-b // n) * n


def run(setup: common.Setup, records: common.Records, *, batch=None, rounds=None) -> dict:
  rounds = rounds or 2
  mesh, c = setup.mesh, setup.config
  b = sample_batch_size(setup, batch)
  batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  key = jax.random.PRNGKey(0)
  label = jax.device_put(jax.random.randint(key, (b,), 0, setup.num_classes), batch_sh)
  z_1 = jax.device_put(jax.random.normal(key, (b, *setup.image_shape)), batch_sh)
  w, rng = jax.device_put((jnp.float32(c.samples.teacher_w), key), repl)
  steps = lambda n: jax.device_put(jnp.int32(n), repl)

  make = lambda net, mode: compiled_samplers.make_sample_fn(
      for_gdistill_net(net, mean_type=c.diffusion.mean_type, num_classes=setup.num_classes),
      mode=mode, sampler='ddim')
  samplers = {'guided teacher': (make(setup.teacher_net, 'guided'), common.teacher_params(setup)),
              'student': (make(setup.student_net, 'student'), common.student_params(setup))}
  compile_s = {}
  for name, (fn, params) in samplers.items():
    # One compilation serves every step count (a traced argument), as in the driver.
    fn, compile_s[name], _ = common.timed_compile(fn, params, label, w, z_1, steps(1), rng,
                                                  options=setup.compile_options)
    common.block(fn(params, label, w, z_1, steps(1), rng))
    samplers[name] = (fn, params)

  cases = [('guided teacher', n) for n in TEACHER_STEPS] + [('student', n) for n in STUDENT_STEPS]

  def call(name, n):
    fn, params = samplers[name]
    n_arr = steps(n)
    return lambda: fn(params, label, w, z_1, n_arr, rng)
  times = common.interleaved_times({case: call(*case) for case in cases}, rounds=rounds,
                                   min_call_seconds=0.2 if setup.quick else 0.5)

  per_step = lambda name: compiled_samplers.nfe_per_step(
      'guided' if name == 'guided teacher' else 'student')
  nfe = {(name, n): n * per_step(name)
         for name, n in cases}
  ref = ('guided teacher', REFERENCE_TEACHER_STEPS)
  rows = []
  for case in cases:
    rows.append([case[0], case[1], nfe[case], times[case], b / times[case],
                 times[ref] / times[case], nfe[ref] / nfe[case],
                 (times[ref] / times[case]) / (nfe[ref] / nfe[case])])
  common.table(f'Sampling, batch {b} ({setup.describe()})\n'
                f'compile: guided teacher {compile_s["guided teacher"]:.1f}s, '
                f'student {compile_s["student"]:.1f}s (once for every N)',
                ['sampler', 'steps', 'NFE/image', 'seconds', 'img/s',
                 f'speed-up vs 2x{REFERENCE_TEACHER_STEPS}', 'NFE ratio', 'speed-up/NFE ratio'],
                rows)
  for case in cases:
    tag = 'teacher_guided' if case[0] == 'guided teacher' else 'student'
    records.add(f'sampling_{tag}_{case[1]}steps_images_per_s', b / times[case], 'images/s')
  stu = ('student', REFERENCE_STUDENT_STEPS)
  speedup = times[ref] / times[stu]
  records.add('sampling_speedup_4step_student_vs_2x256_teacher', speedup, 'x')
  records.add('sampling_nfe_ratio_4step_student_vs_2x256_teacher', nfe[ref] / nfe[stu], 'x')
  records.add('sampling_speedup_over_nfe_ratio', speedup / (nfe[ref] / nfe[stu]), 'fraction')
  return {'times': times, 'batch': b}


def main():
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument('--sample-batch', type=int, default=None,
                 help='images per sampler call (default: 2 per class on CPU, 64 on accelerators)')
  args = p.parse_args()
  records = common.Records()
  run(common.make_setup(args), records, batch=args.sample_batch)
  if args.json:
    records.write(args.json)


if __name__ == '__main__':
  main()
