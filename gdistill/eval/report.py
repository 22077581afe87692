"""The sweep's report: DIR/eval/report.json and the same as Markdown tables.

report.json = {"protocol": {...}, "floor": {...}, "claims": [...], "rows": [...]}, one row
per evaluated setting with keys model (teacher, teacher_ddim, student, consistency), steps, nfe,
sampler, w, fid, is, is_std, precision, recall, num_samples, seconds_per_image,
checkpoint (phase@step) and weights (ema or raw). Non-finite numbers are written as null.
With rows of more than one distillation method, "methods" holds their side-by-side
comparison and "training" each method's training cost (``loop.TrainCost``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Optional

from gdistill import methods, run_plan, storage
from gdistill.metric_writer import log

JSON_NAME = 'report.json'
MD_NAME = 'report.md'
MODEL_ORDER = {m: i for i, m in enumerate(methods.ROW_MODELS)}
DISTILLED = tuple(m for m in methods.ROW_MODELS if not methods.is_teacher_row(m))
# The paper's claims (METHOD.md section 7) as targets: student steps -> allowed FID excess
# over the guided-DDIM teacher at its largest step count.
CLAIM_TOLERANCE = {8: 0.10, 4: 0.25}
FLOOR_FACTOR = 3.0  # the reference teacher's FID at most this many times the floor's
PR_TOLERANCE = 0.05  # the 8- and 4-step students' precision and recall against the teacher
NOT_COMPARABLE = ('FID and IS below are computed in the feature space of gdistill\'s own '
                  'classifier, not Inception-v3: they rank settings of this dataset against '
                  'each other and against the floor, and are not comparable to Inception '
                  'FID / IS in the literature.')


TEACHER_SAMPLING = {
    'guided': 'the guided x_hat^w clipped to [-1, 1] at every step (guidance.teacher_clip='
              "'guided')",
    'branches': 'the conditional and unconditional x_hat clipped to [-1, 1] separately, '
                "x_hat^w not (the authors' way; guidance.teacher_clip='branches')",
}


def make_protocol(*, config, num_classes: int, image_shape, feature_net: dict,
                  reference_examples: int, checkpoints: dict, missing: list,
                  num_devices: int) -> dict:
  """Everything a reader needs to reproduce or compare the numbers."""
  e = config.eval
  return {
      'dataset': config.data.name, 'image_shape': [int(s) for s in image_shape],
      'num_classes': int(num_classes),
      'feature_network': feature_net,
      'note': '' if feature_net.get('comparable_to_inception_fid') else NOT_COMPARABLE,
      'reference_split': e.reference_split, 'reference_examples': int(reference_examples),
      'floor_split': e.floor_split or config.data.eval_split,
      'num_samples': int(e.num_samples), 'batch_size': int(e.batch_size), 'seed': int(e.seed),
      'labels': 'class-balanced: sample i has label i mod K; the same labels and noise z_1 '
                'in every row',
      'quantisation': 'uint8 round((clip(x, -1, 1) + 1) * 127.5) before the feature network',
      'is_splits': 10, 'precision_recall_k': int(e.precision_recall_k),
      'precision_recall_real': f'{int(e.num_samples)} random images of the '
                               f'{e.reference_split} split',
      'weights': {phase: c['weights'] for phase, c in checkpoints.items()},
      'checkpoints': {phase: c['step'] for phase, c in checkpoints.items()},
      'missing_students': list(missing),
      'nfe': 'network evaluations per sample: guided teacher step = 2 (conditional and '
             'unconditional branches), student step = 1',
      'stochastic_sampler': (f'an N-step stochastic row uses the N/2-step student '
                             f'(stage2.time_grid={config.stage2.time_grid!r})'
                             if run_plan.fine_grid(config) else
                             f'none: the students learnt their own DDIM grid only '
                             f'(stage2.time_grid={config.stage2.time_grid!r}; \'both\' '
                             f'trains the N/2-step student for the N-step stochastic '
                             f'sampler too)'),
      'teacher_clip': config.guidance.get('teacher_clip', 'guided'),
      'teacher_sampling': TEACHER_SAMPLING[config.guidance.get('teacher_clip', 'guided')],
      'seconds_per_image': f'sampling wall-clock after compilation / images sampled '
                           f'(batches of {int(e.batch_size)} over {num_devices} '
                           f'{_platform()} device(s))',
  }


def _platform() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.devices()[0].platform


def fingerprint(protocol_dict: dict, feature_fingerprint: str) -> str:
  """Rows computed under the same fingerprint are comparable and reusable."""
  p = protocol_dict
  keys = ('dataset', 'reference_split', 'reference_examples', 'num_samples', 'batch_size',
          'seed', 'precision_recall_k')
  extra = {}
  if p.get('teacher_clip', 'guided') != 'guided':  # only where set: earlier rows stay reusable
    extra['teacher_clip'] = p['teacher_clip']
  blob = json.dumps({'features': feature_fingerprint, **{k: p[k] for k in keys}, **extra},
                    sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def reusable_rows(path: str, fp: str) -> list[dict]:
  """The rows of an existing report with the same fingerprint, else none."""
  if not storage.isfile(path):
    return []
  try:
    old = json.loads(storage.read_text(path))
  except (OSError, ValueError):
    log(f'eval: {path} is unreadable; starting a fresh report')
    return []
  if old.get('protocol', {}).get('fingerprint') != fp:
    log(f'eval: {path} was made under another protocol (samples, seed, feature network or '
        f'reference); its rows are not reused')
    return []
  return list(old.get('rows', []))


def _finite(x) -> Optional[float]:
  return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _steps(n: int) -> str:
  return f'{n} step' + ('' if n == 1 else 's')


def _sort_key(r: dict):
  return (r['w'], MODEL_ORDER.get(r['model'], 9), r['sampler'], r['nfe'])


def claims(rows: list[dict], floor: Optional[dict] = None) -> list[dict]:
  """The paper's claims checked on the rows, per w (METHOD.md section 7).

  * at w = 0, the teacher (the guided-DDIM row with most steps) within ``FLOOR_FACTOR``
    times the real-data floor's FID, when the floor was measured with as many images as a
    row: the teacher is good enough for "the student matches it" to mean something (at
    w > 0 guidance trades diversity for fidelity, so FID against real data rises by design);
  * an 8-step student (best of its samplers) within 10% of the teacher's FID, a
    4-step one within 25%, and their precision and recall within ``PR_TOLERANCE`` of
    the teacher's;
  * every student row better than the teacher's guided DDIM at the same NFE.
  """
  out = []
  for w in sorted({r['w'] for r in rows}):
    rs = [r for r in rows if r['w'] == w and _finite(r.get('fid')) is not None]
    teachers = [r for r in rs if r['model'] == 'teacher']
    students = [r for r in rs if r['model'] == 'student']
    if teachers:
      ref = max(teachers, key=lambda r: r['steps'])
      teacher_name = f'{_steps(ref["steps"])}, NFE {ref["nfe"]}'
      if w == 0 and floor and _finite(floor.get('fid')) is not None and \
          floor.get('num_samples') == ref.get('num_samples'):
        out.append({'w': w, 'claim': f'teacher ({teacher_name}) FID within {FLOOR_FACTOR:g}x '
                                     f'the real-data floor ({floor["num_samples"]} images)',
                    'student': '-', 'value': ref['fid'], 'reference': floor['fid'],
                    'target': FLOOR_FACTOR * floor['fid'],
                    'passed': ref['fid'] <= FLOOR_FACTOR * floor['fid']})
      for steps, tol in sorted(CLAIM_TOLERANCE.items(), reverse=True):
        cands = [r for r in students if r['steps'] == steps]
        if not cands:
          continue
        best = min(cands, key=lambda r: r['fid'])
        target = ref['fid'] * (1 + tol)
        student = f'{best["sampler"]} {_steps(best["steps"])}'
        out.append({'w': w, 'claim': f'{steps}-step student FID within {tol:.0%} of the '
                                     f'teacher ({teacher_name})',
                    'student': student,
                    'value': best['fid'], 'reference': ref['fid'], 'target': target,
                    'passed': best['fid'] <= target})
        for metric in ('precision', 'recall'):
          have, want = _finite(best.get(metric)), _finite(ref.get(metric))
          if have is None or want is None:
            continue
          out.append({'w': w, 'claim': f'{steps}-step student {metric} within '
                                       f'{PR_TOLERANCE:g} of the teacher\'s',
                      'student': student, 'value': have, 'reference': want,
                      'target': f'{want - PR_TOLERANCE:.3f}..{want + PR_TOLERANCE:.3f}',
                      'passed': abs(have - want) <= PR_TOLERANCE})
    baselines = {r['nfe']: r for r in rs if r['model'] in ('teacher', 'teacher_ddim')}
    for r in sorted(students, key=lambda r: (r['nfe'], r['sampler'])):
      b = baselines.get(r['nfe'])
      if b is None:
        continue
      out.append({'w': w, 'claim': f'student beats the teacher\'s guided DDIM at NFE '
                                   f'{r["nfe"]} ({_steps(b["steps"])})',
                  'student': f'{r["sampler"]} {_steps(r["steps"])}',
                  'value': r['fid'], 'reference': b['fid'], 'target': b['fid'],
                  'passed': r['fid'] < b['fid']})
  return out


def method_label(model: str) -> str:
  """The report's name of a distilled row model (``methods``)."""
  kind = methods.kind_of_row(model)
  return methods.METHODS[kind].label if kind else model


def compare_methods(rows: list[dict]) -> list[dict]:
  """Per w and NFE where two or more distillation methods have rows: each method's best
  FID there (its sampler), and the better method."""
  out = []
  for w in sorted({r['w'] for r in rows}):
    rs = [r for r in rows if r['w'] == w and r['model'] in DISTILLED
          and _finite(r.get('fid')) is not None]
    for nfe in sorted({r['nfe'] for r in rs}):
      best = {}
      for r in rs:
        if r['nfe'] == nfe and (r['model'] not in best or r['fid'] < best[r['model']]['fid']):
          best[r['model']] = r
      if len(best) < 2:
        continue
      winner = min(best.values(), key=lambda r: r['fid'])
      out.append({'w': w, 'nfe': nfe, 'better': method_label(winner['model']),
                  **{method_label(m): {'fid': r['fid'], 'sampler': r['sampler'],
                                       'steps': r['steps'], 'precision': r.get('precision'),
                                       'recall': r.get('recall')}
                     for m, r in best.items()}})
  return out


def training_costs(costs: dict, phase_kinds: dict) -> dict:
  """Each method's training cost: {label: {phases, steps, images, minutes}} from
  ``loop.read_costs`` and {phase: kind}."""
  out = {}
  for phase, c in sorted(costs.items()):
    kind = phase_kinds.get(phase)
    if kind is None:
      continue
    m = out.setdefault(methods.METHODS[kind].label,
                       {'phases': [], 'steps': 0, 'images': 0, 'minutes': 0.0})
    m['phases'].append(phase)
    m['steps'] += int(c.get('steps', 0))
    m['images'] += int(c.get('images', 0))
    m['minutes'] = round(m['minutes'] + float(c.get('seconds', 0.0)) / 60.0, 2)
  return out


def build(*, protocol: dict, floor: dict, rows: list[dict],
          training: Optional[dict] = None) -> dict:
  """The report dict; ``training``: ``training_costs``' of the run (kept only beside a
  comparison of methods)."""
  rows = sorted(rows, key=_sort_key)
  out = {'protocol': protocol, 'floor': floor, 'claims': claims(rows, floor), 'rows': rows}
  compared = compare_methods(rows)
  if compared:
    out['methods'] = compared
    out['training'] = training or {}
  return out


def _clean(x):
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  if isinstance(x, float):
    return _finite(x)
  return x


def _fmt(x, digits=3) -> str:
  x = _finite(x) if not isinstance(x, bool) else x
  return '-' if x is None else f'{x:.{digits}f}'


def _ms(seconds) -> Optional[float]:
  return None if _finite(seconds) is None else seconds * 1e3


def markdown(rep: dict) -> str:
  """The report as Markdown: protocol, floor, claims, then one table per w."""
  p, floor = rep['protocol'], rep['floor']
  fn = p['feature_network']
  weights = ', '.join(f'{k} {v} (step {p["checkpoints"][k]})' for k, v in p['weights'].items())
  lines = [f'# gdistill evaluation: {p["dataset"]}', '',
           f'- Samples: {p["num_samples"]} per row ({p["labels"]}); seed {p["seed"]}, '
           f'batches of {p["batch_size"]}.',
           f'- Feature network: {fn["description"]} ({fn["path"]}).',
           f'- FID against the {p["reference_split"]} split ({p["reference_examples"]} images); '
           f'IS over {p["is_splits"]} splits; precision/recall with k={p["precision_recall_k"]} '
           f'against {p["precision_recall_real"]}.',
           f'- Weights: {weights}.',
           f'- NFE: {p["nfe"]}. Stochastic sampler: {p["stochastic_sampler"]}.',
           f'- Guided teacher rows: {p.get("teacher_sampling", TEACHER_SAMPLING["guided"])}.',
           f'- Seconds per image: {p["seconds_per_image"]}.']
  if p.get('missing_students'):
    lines.append(f'- Not evaluated (no finished checkpoint): {", ".join(p["missing_students"])}.')
  sources = sorted({r['source'] for r in rep['rows'] if r.get('source')})
  if sources:
    lines.append(f'- Rows marked * were not sampled in this run: they were measured once for '
                 f'this very teacher file under this very protocol (same fingerprint) and '
                 f'ship with it: {", ".join(sources)}.')
  if p.get('note'):
    lines += ['', f'> {p["note"]}']
  lines += ['', '## Floor: real held-out images', '',
            '| split | images | FID | FID (whole split) | IS | precision | recall |',
            '|---|---|---|---|---|---|---|',
            f'| {floor["split"]} | {floor["num_samples"]} | {_fmt(floor["fid"])} | '
            f'{_fmt(floor["fid_full"])} ({floor["num_full"]}) | {_fmt(floor["is"])} | '
            f'{_fmt(floor["precision"])} | {_fmt(floor["recall"])} |']
  if rep['claims']:
    lines += ['', '## The paper\'s claims as targets', '',
              '| w | claim | student | value | reference | target | result |',
              '|---|---|---|---|---|---|---|']
    for c in rep['claims']:
      lines.append(f'| {c["w"]:g} | {c["claim"]} | {c["student"]} | {_fmt(c["value"])} | '
                   f'{_fmt(c["reference"])} | '
                   f'{c["target"] if isinstance(c["target"], str) else _fmt(c["target"])} | '
                   f'{"pass" if c["passed"] else "FAIL"} |')
  if rep.get('methods'):
    lines += _methods_markdown(rep)
  for w in sorted({r['w'] for r in rep['rows']}):
    lines += ['', f'## w = {w:g}', '',
              '| model | sampler | steps | NFE | FID | IS | precision | recall | ms / image |',
              '|---|---|---|---|---|---|---|---|---|']
    for r in (r for r in rep['rows'] if r['w'] == w):
      model = r['model'] + (' *' if r.get('source') else '')
      lines.append(f'| {model} | {r["sampler"]} | {r["steps"]} | {r["nfe"]} | '
                   f'{_fmt(r["fid"])} | {_fmt(r["is"])} | {_fmt(r["precision"])} | '
                   f'{_fmt(r["recall"])} | {_fmt(_ms(r.get("seconds_per_image")), 2)} |')
  lines += ['', '## Plots', '', '![FID vs NFE](fid_vs_nfe.png)', '',
            '![FID vs IS](fid_vs_is.png)', '', '![Precision and recall vs w](pr_vs_w.png)', '',
            'Sample grids (a row per class): `samples/<model>-<sampler>-steps<N>-w<w>.png`.', '']
  return '\n'.join(lines)


def _methods_markdown(rep: dict) -> list[str]:
  labels = [method_label(m) for m in DISTILLED
            if any(method_label(m) in c for c in rep['methods'])]
  lines = ['', '## Distillation methods side by side', '',
           'Each method\'s best FID at each NFE (its sampler and step count in brackets); '
           'one teacher, one protocol.', '',
           '| w | NFE | ' + ' | '.join(labels) + ' | better |',
           '|---|---|' + '---|' * len(labels) + '---|']
  for c in rep['methods']:
    cells = [f'{_fmt(c[l]["fid"])} ({c[l]["sampler"]}, {_steps(c[l]["steps"])})' if l in c
             else '-' for l in labels]
    lines.append(f'| {c["w"]:g} | {c["nfe"]} | ' + ' | '.join(cells) + f' | {c["better"]} |')
  training = rep.get('training') or {}
  if training:
    lines += ['', '| method | phases | training steps | images seen | minutes (wall) |',
              '|---|---|---|---|---|']
    for label, t in training.items():
      lines.append(f'| {label} | {", ".join(t["phases"])} | {t["steps"]} | {t["images"]:,} | '
                   f'{t["minutes"]:.1f} |')
  return lines


def write(eval_dir: str, *, protocol: dict, floor: dict, rows: list[dict],
          training: Optional[dict] = None) -> dict:
  """Writes report.json and report.md; returns the report dict."""
  rep = _clean(build(protocol=protocol, floor=floor, rows=rows, training=training))
  storage.write_text(os.path.join(eval_dir, JSON_NAME), json.dumps(rep, indent=1) + '\n')
  storage.write_text(os.path.join(eval_dir, MD_NAME), markdown(rep))
  return rep
