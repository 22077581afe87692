"""The report's figures (matplotlib, Agg backend), from report.json's rows.

  fid_vs_nfe.png  FID against NFE (log2 axis), a panel per w: the guided-DDIM teacher
                  (its reference and few-step rows form one curve), the deterministic
                  and the stochastic students, the consistency student (multistep
                  consistency sampling) and the real-data floor (Figures 1-2).
  fid_vs_is.png   FID against IS as w varies, a curve per (model, sampler, steps),
                  points labelled by w (Figure 4).
  pr_vs_w.png     precision and recall against w, the same curves.
"""

from __future__ import annotations

import math
import os
from typing import Optional

from gdistill import methods, storage

SERIES = (  # (label, model names, sampler, style)
    ('teacher, guided DDIM', ('teacher', 'teacher_ddim'), 'ddim', dict(color='k', marker='o')),
    ('student, deterministic', ('student',), 'ddim', dict(color='tab:blue', marker='s')),
    ('student, stochastic', ('student',), 'stochastic', dict(color='tab:red', marker='^')),
    ('consistency student', ('consistency',), 'consistency',
     dict(color='tab:green', marker='D')),
)
NAMES = {'teacher': 'teacher', 'teacher_ddim': 'teacher DDIM', 'student': 'student',
         'consistency': 'consistency'}
MARKERS = {'ddim': 'o', 'stochastic': '^', 'consistency': 'D'}


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _ok(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def _save(fig, path: str) -> str:
  fig.tight_layout()
  storage.write_with(path, lambda f: fig.savefig(f, format='png', dpi=110))
  return path


def fid_vs_nfe(rows: list[dict], path: str, *, floor: Optional[dict] = None) -> str:
  plt = _pyplot()
  ws = sorted({r['w'] for r in rows})
  cols = min(len(ws), 3)
  nrows = -(-len(ws) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
  for ax, w in zip(axes.flat, ws):
    fids = []
    for label, models, sampler, style in SERIES:
      pts = sorted((r['nfe'], r['fid']) for r in rows
                   if r['w'] == w and r['model'] in models and r['sampler'] == sampler
                   and _ok(r['fid']))
      if pts:
        ax.plot(*zip(*pts), label=label, **style)
        fids += [f for _, f in pts]
    if floor and _ok(floor.get('fid')):
      ax.axhline(floor['fid'], color='gray', ls='--',
                 label=f'floor ({floor["split"]}, {floor["num_samples"]} images)')
      fids.append(floor['fid'])
    ax.set_xscale('log', base=2)
    if fids and min(fids) > 0:
      ax.set_yscale('log')
    ax.set_xlabel('NFE (network evaluations per sample)')
    ax.set_ylabel('FID')
    ax.set_title(f'w = {w:g}')
    ax.grid(True, which='both', alpha=0.3)
  for ax in list(axes.flat)[len(ws):]:
    ax.axis('off')
  axes.flat[0].legend(fontsize=7)
  return _save(fig, path)


def _curves(rows: list[dict]):
  """(label, style, rows sorted by w) per (model, sampler, steps) with >= 1 finite row."""
  keys = sorted({(r['model'], r['sampler'], r['steps']) for r in rows},
                key=lambda k: (methods.is_teacher_row(k[0]), k[0], k[1], k[2]))
  plt = _pyplot()
  cmap = plt.get_cmap('viridis')
  steps_all = sorted({k[2] for k in keys})
  for model, sampler, steps in keys:
    rs = sorted((r for r in rows
                 if (r['model'], r['sampler'], r['steps']) == (model, sampler, steps)
                 and _ok(r['fid']) and _ok(r['is'])), key=lambda r: r['w'])
    if not rs:
      continue
    frac = steps_all.index(steps) / max(len(steps_all) - 1, 1)
    teacher = methods.is_teacher_row(model)
    shade = plt.get_cmap('Greys')(0.45 + 0.55 * frac) if teacher else (
        cmap(frac) if model == 'student' else plt.get_cmap('Greens')(0.4 + 0.6 * frac))
    style = dict(color=shade, marker='x' if teacher else MARKERS.get(sampler, 'o'),
                 ls=':' if teacher else '-')
    name = NAMES.get(model, model)
    yield f'{name} {sampler} {steps} steps', style, rs


def fid_vs_is(rows: list[dict], path: str) -> str:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 5))
  for label, style, rs in _curves(rows):
    ax.plot([r['is'] for r in rs], [r['fid'] for r in rs], label=label, **style)
    for r in rs:
      ax.annotate(f'{r["w"]:g}', (r['is'], r['fid']), fontsize=6, xytext=(2, 2),
                  textcoords='offset points')
  if all(r['fid'] > 0 for r in rows if _ok(r['fid'])):
    ax.set_yscale('log')
  ax.set_xlabel('Inception Score (feature network logits)')
  ax.set_ylabel('FID')
  ax.set_title('FID vs IS as the guidance weight w varies (points labelled by w)')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=6, ncol=2)
  return _save(fig, path)


def pr_vs_w(rows: list[dict], path: str) -> str:
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for label, style, rs in _curves(rows):
    for ax, key in zip(axes, ('precision', 'recall')):
      pts = [(r['w'], r[key]) for r in rs if _ok(r[key])]
      if pts:
        ax.plot(*zip(*pts), label=label, **style)
  for ax, key in zip(axes, ('precision', 'recall')):
    ax.set_xlabel('guidance weight w')
    ax.set_ylabel(key)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
  axes[1].legend(fontsize=6, ncol=2)
  return _save(fig, path)


def write_all(eval_dir: str, rep: dict) -> list[str]:
  """Writes every figure of the report into ``eval_dir``; returns their paths."""
  rows = rep['rows']
  if not rows:
    return []
  plt = _pyplot()
  paths = [fid_vs_nfe(rows, os.path.join(eval_dir, 'fid_vs_nfe.png'), floor=rep.get('floor')),
           fid_vs_is(rows, os.path.join(eval_dir, 'fid_vs_is.png')),
           pr_vs_w(rows, os.path.join(eval_dir, 'pr_vs_w.png'))]
  plt.close('all')
  return paths
