"""Sampler compile time for N in {4, 64, 1024} steps.

gdistill's samplers run one ``lax.fori_loop`` whose trip count is a traced
argument, so the compiled program does not grow with N: compile time should
be flat. Each N gets a fresh jitted sampler (no cache hit), lowered and
compiled ahead of time for the guided teacher (the largest program: two
branches per step) and the student; rounds are interleaved and the minimum
is kept (compile time has a long tail under load).

  python benchmarks/compile_time.py [--quick] [--config configs/X.py] [--json FILE]
"""

from __future__ import annotations

import common  # pylint: disable=g-bad-import-order  # sets up sys.path and XLA_FLAGS first

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from gdistill import compiled_samplers, sharding  # pylint: disable=g-import-not-at-top
from gdistill.denoiser import for_gdistill_net  # pylint: disable=g-import-not-at-top

STEPS = (4, 64, 1024)


def run(setup: common.Setup, records: common.Records, *, rounds=None) -> dict:
  rounds = rounds or (1 if setup.quick else 2)
  mesh, c = setup.mesh, setup.config
  b = setup.mesh.size * max(1, -(-setup.num_classes // setup.mesh.size))
  batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  key = jax.random.PRNGKey(0)
  label = jax.device_put(jnp.zeros((b,), jnp.int32), batch_sh)
  z_1 = jax.device_put(jnp.zeros((b, *setup.image_shape)), batch_sh)
  w, rng = jax.device_put((jnp.float32(1.0), key), repl)
  nets = {'guided teacher': (setup.teacher_net, 'guided', common.teacher_params(setup)),
          'student': (setup.student_net, 'student', common.student_params(setup))}

  def compile_once(name, n):
    net, mode, params = nets[name]
    fn = compiled_samplers.make_sample_fn(
        for_gdistill_net(net, mean_type=c.diffusion.mean_type, num_classes=setup.num_classes),
        mode=mode, sampler='ddim')
    steps = jax.device_put(jnp.int32(n), repl)
    return common.timed_compile(fn, params, label, w, z_1, steps, rng,
                                options=setup.compile_options)[1]

  compile_once('student', 4)  # first-use costs (backend, tracing caches) out of the timings
  times = {(name, n): [] for name in nets for n in STEPS}
  for _ in range(rounds):
    for name, n in times:
      times[(name, n)].append(compile_once(name, n))
  best = {k: min(v) for k, v in times.items()}
  rows = [[name] + [best[(name, n)] for n in STEPS] + [best[(name, STEPS[-1])] / best[(name, STEPS[0])]]
          for name in nets]
  common.table(f'Sampler compile time, seconds, min of {rounds} ({setup.describe()})',
               ['sampler'] + [f'N={n}' for n in STEPS] + [f'N={STEPS[-1]} / N={STEPS[0]}'], rows)
  for (name, n), t in best.items():
    tag = 'teacher_guided' if name == 'guided teacher' else 'student'
    records.add(f'sampler_compile_seconds_{tag}_n{n}', t, 's')
  ratio = max(best[(name, STEPS[-1])] / best[(name, STEPS[0])] for name in nets)
  records.add('sampler_compile_ratio_1024_over_4', ratio, 'ratio')
  return {'times': best}


if __name__ == '__main__':
  common.script_main(__doc__.splitlines()[0], run)
