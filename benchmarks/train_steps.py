"""Training throughput of the teacher, stage-1 and stage-2 steps.

For each step at the same global batch: images/s, XLA's flop count, the
achieved fraction of the machine's peak (a large jitted matmul in the
compute dtype, measured in the same run), the ratio to the teacher step, and
memory (XLA's memory analysis per device; the device's peak where it reports
one, else the process's max RSS).

  python benchmarks/train_steps.py [--quick] [--config configs/X.py] [--json FILE]
"""

from __future__ import annotations

import common  # pylint: disable=g-bad-import-order  # sets up sys.path and XLA_FLAGS first

import jax  # pylint: disable=g-import-not-at-top

from gdistill import sharding  # pylint: disable=g-import-not-at-top


STEPS = ('teacher', 'stage1', 'stage2')


def run(setup: common.Setup, records: common.Records, *, rounds=None, which=STEPS) -> dict:
  rounds = rounds or (4 if setup.quick else 8)
  mesh, strategy, batch = setup.mesh, setup.config.sharding, setup.batch
  matmul = common.MatmulPeak(mesh, setup.dtype, size=1024 if setup.quick else None,
                             options=setup.compile_options)
  data = common.random_batch(setup, batch)
  rng = jax.device_put(jax.random.PRNGKey(0), sharding.replicated(mesh))

  # Only the steps asked for: each one's frozen parameters cost an init compile.
  steps = [common.teacher_step(setup)]
  if 'stage1' in which:
    steps.append(common.stage1_step(setup, common.teacher_params(setup)))
  if 'stage2' in which:
    steps.append(common.stage2_step(setup, common.student_params(setup)))
  states, compiled, compile_s, flops, mem = {}, {}, {}, {}, {}
  for step in steps:
    state = step.build_state(mesh, strategy)
    compiled[step.name], compile_s[step.name], lowered = step.compile(
        mesh, state, data, rng, setup.compile_options)
    flops[step.name] = common.cost_flops(lowered)  # global, before optimisation
    mem[step.name] = common.memory_bytes(compiled[step.name])
    # Two warm-up steps (first-touch allocations, thread pools).
    for _ in range(2):
      state, metrics = compiled[step.name](state, step.frozen, data, rng)
    common.block(metrics)
    states[step.name] = state
    print(f'{step.name}: compiled in {compile_s[step.name]:.1f}s', flush=True)

  def runner(step):
    def fn():
      states[step.name], metrics = compiled[step.name](states[step.name], step.frozen, data, rng)
      return metrics
    return fn
  # The matmul peak is timed in the same rounds as the steps (see MatmulPeak).
  times = common.interleaved_times({**{s.name: runner(s) for s in steps}, **matmul.fns()},
                                   rounds=rounds, min_seconds=0 if setup.quick else 20)
  peak = matmul.result(times)
  dev_peak = common.device_peak_bytes()
  rss = common.max_rss_bytes()

  rows = []
  for s in steps:
    t = times[s.name]
    rate = flops[s.name] / t
    rows.append([s.name, batch, t * 1e3, batch / t, flops[s.name] / 1e9, rate / 1e9,
                 rate / peak['peak'], t / times['teacher'], compile_s[s.name],
                 mem[s.name].get('peak_estimate', float('nan')) / 2**20])
  common.table(f'Training steps ({setup.describe()})\n'
               f'peak: {peak["peak"] / 1e9:.1f} GFLOP/s ({peak["size"]}^3 matmul in '
               f'{setup.config.precision}: one device {peak["one_device"] / 1e9:.1f}, all '
               f'{mesh.size} devices {peak["all_devices"] / 1e9:.1f})',
               ['step', 'batch', 'ms/step', 'img/s', 'GFLOP/step', 'GFLOP/s', 'of peak',
                'x teacher', 'compile s', 'MiB/device (XLA)'], rows)
  print(f'memory: device peak {"n/a" if dev_peak is None else f"{dev_peak / 2**20:.0f} MiB"}, '
        f'process max RSS {rss / 2**20:.0f} MiB')

  records.add('matmul_peak_flops', peak['peak'], 'FLOP/s')
  for s in steps:
    n = s.name
    records.add(f'{n}_step_images_per_s', batch / times[n], 'images/s')
    records.add(f'{n}_step_seconds', times[n], 's')
    records.add(f'{n}_step_flops', flops[n], 'FLOP')
    records.add(f'{n}_step_peak_fraction', flops[n] / times[n] / peak['peak'], 'fraction')
    records.add(f'{n}_step_compile_seconds', compile_s[n], 's')
    records.add(f'{n}_step_memory_per_device', mem[n].get('peak_estimate', float('nan')),
                'bytes')
  for n in ('stage1', 'stage2'):
    if n in times:
      records.add(f'{n}_step_over_teacher_step', times[n] / times['teacher'], 'ratio')
  if dev_peak is not None:
    records.add('device_peak_memory', dev_peak, 'bytes')
  records.add('process_max_rss', rss, 'bytes')
  return {'times': times, 'flops': flops, 'peak': peak}


def main():
  common.script_main(__doc__.splitlines()[0], run, STEPS, ' (the teacher always runs)')


if __name__ == '__main__':
  main()
