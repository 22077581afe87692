"""A teacher's curve from sampler_study.py runs at several checkpoints: FID of the EMA,
the raw and the bias-corrected EMA weights against images seen and training minutes.

  python benchmarks/plot_teacher_study.py --workdir=/work/runs/teacher_a \\
      --inputs='/work/runs/study/step*.json' --output=docs/teacher_curve

Writes OUTPUT.json (the rows) and OUTPUT.png. Minutes come from the checkpoints' commit
times, counted from the run's first log line when --start is given (else from the first
checkpoint, extrapolated back).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--inputs', required=True, help='glob of sampler_study.py JSON files')
  p.add_argument('--row', default='N16/clip/uniform_t/w0', help='row name after WEIGHTS/')
  p.add_argument('--batch', type=int, default=64, help='training batch (images per step)')
  p.add_argument('--output', required=True, help='output prefix')
  args = p.parse_args()

  from gdistill import checkpoint, teacher_file  # pylint: disable=g-import-not-at-top
  from gdistill.eval import quick_fid  # pylint: disable=g-import-not-at-top
  directory = checkpoint.phase_dir(args.workdir, 'teacher')
  rows, floor = {}, None
  for path in sorted(glob.glob(args.inputs)):
    with open(path) as f:
      study = json.load(f)
    step = int(study['protocol']['step'])
    for r in study['rows']:
      weights, _, rest = r['name'].partition('/')
      if rest == args.row:
        rows.setdefault(step, {'step': step, 'images_seen': step * args.batch})[
            f'fid_{weights}'] = r['fid']
    floor = study.get('floor', floor)
  steps = sorted(rows)
  times = teacher_file.step_times(directory, steps)
  minutes = quick_fid.estimated_minutes(steps, [times[s] for s in steps])
  out = []
  for s, m in zip(steps, minutes):
    out.append(dict(rows[s], minutes=m))

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for key, label in (('fid_raw', 'raw weights'), ('fid_ema', 'EMA 0.999 (shipped)'),
                     ('fid_ema_debiased', 'EMA, bias-corrected')):
    pts = [(r['images_seen'], r[key]) for r in out if key in r]
    if pts:
      ax.plot(*zip(*pts), marker='o', label=label)
  if floor:
    ax.axhline(floor['fid'], color='gray', ls='--',
               label=f'real held-out images ({floor["num_samples"]})')
  ax.set_yscale('log')
  ax.set_xlabel('images seen')
  ax.set_ylabel(f'FID ({args.row}, classifier features)')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend()
  top = ax.twiny()
  top.set_xlim(ax.get_xlim())
  ticks = [r['images_seen'] for r in out if r['minutes'] is not None][::2]
  top.set_xticks(ticks)
  top.set_xticklabels([f'{r["minutes"]:.0f}' for r in out if r['minutes'] is not None][::2])
  top.set_xlabel('minutes of training (checkpoint times; machine shared)')
  fig.tight_layout()
  fig.savefig(args.output + '.png', dpi=110)
  with open(args.output + '.json', 'w') as f:
    json.dump({'row': args.row, 'floor': floor, 'rows': out}, f, indent=2)
  for r in out:
    print(r)
  print(f'wrote {args.output}.png and {args.output}.json')


if __name__ == '__main__':
  main()
