"""CPU: teacher-step throughput with 1, 2, ... host devices (data parallel).

XLA's CPU convolutions use little of a second core, so gdistill asks XLA for
one host device per core (gdistill/cli_setup.py) and splits the batch over
them. This measures that choice: each device count runs in its own process
(the count is fixed when JAX starts), one after another.

  python benchmarks/cpu_devices.py [--quick] [--config configs/X.py] [--devices 1,2,4] [--json FILE]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import common  # pylint: disable=g-bad-import-order  # sets up sys.path and XLA_FLAGS first

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(devices: int, args) -> dict:
  """Runs train_steps.py (teacher only) with ``devices`` host devices."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', GDISTILL_CPU_DEVICES=str(devices))
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if 'xla_force_host_platform_device_count' not in f]
  env['XLA_FLAGS'] = ' '.join(flags)
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'records.json')
    cmd = [sys.executable, os.path.join(HERE, 'train_steps.py'), '--steps=teacher',
           f'--json={out}']
    cmd += ['--quick'] if args.quick else []
    cmd += [f'--config={args.config}'] if args.config else []
    cmd += [f'--batch={args.batch}'] if args.batch else []
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
      return {r['name']: r['value'] for r in json.load(f)}


def main():
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument('--devices', default='1,2', help='host device counts to compare')
  args = p.parse_args()
  counts = [int(n) for n in args.devices.split(',')]
  results = {n: measure(n, args) for n in counts}
  base = results[counts[0]]['teacher_step_images_per_s']
  rows = [[n, r['teacher_step_seconds'] * 1e3, r['teacher_step_images_per_s'],
           r['teacher_step_images_per_s'] / base, r['teacher_step_peak_fraction'],
           r['matmul_peak_flops'] / 1e9] for n, r in results.items()]
  common.table(f"Teacher step vs host devices ({common.cli_setup.usable_cores()} usable cores)",
               ['devices', 'ms/step', 'img/s', f'x {counts[0]} device(s)', 'of peak',
                'peak GFLOP/s'], rows)
  records = common.Records()
  for n, r in results.items():
    records.add(f'cpu_teacher_step_images_per_s_{n}_devices', r['teacher_step_images_per_s'],
                'images/s')
  if args.json:
    records.write(args.json)


if __name__ == '__main__':
  main()
