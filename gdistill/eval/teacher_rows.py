"""A fixed teacher's evaluation rows, measured once and shipped with its weights file.

A teacher that ships as one file (``gdistill.teacher_file``) never changes, and every
evaluation row of it (its guided DDIM at 1-64 steps, each w) is a function of that file and
the evaluation protocol only: the same labels and noise in every row, the same feature
network. Sampling its 2 x 64-step reference rows costs 128k network evaluations per w
(about ten minutes each on the 2-core CPU), paid again by every distillation run. So the
rows are measured once, by a run that samples them, and saved next to the weights:

  python -m gdistill.eval.teacher_rows --report=runs/fashion_mnist/eval/report.json \\
      --teacher=gdistill/weights/fashion_mnist_teacher.msgpack \\
      --output=gdistill/weights/fashion_mnist_teacher_rows.json

The evaluation sweep (``config.eval.teacher_rows``) reuses a shipped row only when the file
was made from this very teacher (the sha256 of its weights) under this very protocol (the
report fingerprint: feature network weights, sample count, batch, seed, reference); each
reused row says so in the report (``source``). Anything else is sampled as usual, and
``--config.eval.teacher_rows=`` samples every teacher row in the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Optional

from gdistill import teacher_file
from gdistill.metric_writer import log

TEACHER_MODELS = ('teacher', 'teacher_ddim')


def teacher_sha256(path: str) -> str:
  """The sha256 of a teacher weights file, from its (verified-at-load) sidecar."""
  return teacher_file.read_info(path)['weights']['sha256']


def load_matching(path: str, *, fingerprint: str, sha256: str) -> list[dict]:
  """The rows of ``path`` if it was measured for this teacher under this protocol, else
  none (with a log line saying why)."""
  try:
    with open(path) as f:
      shipped = json.load(f)
  except (OSError, ValueError) as e:
    log(f'eval: teacher rows {path}: unreadable ({e}); the teacher rows are sampled')
    return []
  if shipped.get('teacher_sha256') != sha256:
    log(f'eval: teacher rows {path} were measured for another teacher file; the teacher '
        f'rows are sampled')
    return []
  if shipped.get('fingerprint') != fingerprint:
    log(f'eval: teacher rows {path} were measured under another protocol (fingerprint '
        f'{shipped.get("fingerprint")}, this run {fingerprint}: samples, seed, batch or '
        f'feature network differ); the teacher rows are sampled')
    return []
  source = f'{os.path.basename(path)} (measured {shipped.get("measured", "?")})'
  return [dict(r, source=source) for r in shipped.get('rows', [])
          if r.get('model') in TEACHER_MODELS]


def export(report_path: str, teacher_path: str, output: str,
           command: Optional[str] = None) -> dict:
  """Writes the teacher rows of ``report_path`` (a run that distilled ``teacher_path``)."""
  with open(report_path) as f:
    rep = json.load(f)
  rows = [r for r in rep['rows'] if r['model'] in TEACHER_MODELS and 'source' not in r]
  if not rows:
    raise ValueError(f'{report_path}: no teacher rows sampled in that run')
  data = {'teacher': os.path.basename(teacher_path), 'teacher_sha256': teacher_sha256(teacher_path),
          'fingerprint': rep['protocol']['fingerprint'],
          'measured': datetime.date.today().isoformat(), 'command': command or '',
          'protocol': rep['protocol'], 'rows': rows}
  tmp = output + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=1)
    f.write('\n')
  os.replace(tmp, output)
  return data


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--report', required=True, help='eval/report.json of a run that sampled them')
  ap.add_argument('--teacher', required=True, help='the teacher weights file that run distilled')
  ap.add_argument('--output', required=True)
  args = ap.parse_args(argv)
  try:
    data = export(args.report, args.teacher, args.output, command=' '.join(sys.argv))
  except (OSError, ValueError, KeyError) as e:
    print(f'gdistill.eval.teacher_rows: {e}', file=sys.stderr)
    return 2
  print(f'wrote {args.output}: {len(data["rows"])} rows (fingerprint {data["fingerprint"]})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
