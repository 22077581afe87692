"""A small, cheap FID of sampling parameters: to track a teacher (or a student) while it
trains, and to draw a teacher's curve from its saved checkpoints.

  quick = QuickFid(feature_net=net, reference=stats, sample_fn=sampler, image_shape=(28, 28, 1),
                   num_classes=10)              # 500 samples, 32 guided DDIM steps, w = 0 and 1
  quick(params)  # {'fid_w0': ..., 'fid_w1': ..., 'is_w0': ..., ..., 'seconds': ...}

Everything expensive is the evaluation sweep's own code (``gdistill.eval.sweep``):
``generate`` samples in fixed batches with inputs that are a function of (seed, batch)
only, so every call, every ``w`` and every checkpoint sees the same labels and noise
z_1 (common random numbers: the differences along a curve are the network's, not
sampling noise), and ``score`` computes FID / IS / precision / recall against the
reference statistics of ``features.split_statistics``. With 500 samples the FID is
biased upwards relative to the sweep's 1000-sample rows (and noisier, about 0.3 in the
classifier's space): compare numbers of one sample count only, and against
``floor_metrics`` at the same count.

``checkpoint_curve`` scores saved steps of a phase directory (``benchmarks/teacher_curve.py``
is its command line) and ``plot_curve`` draws FID against images seen.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import numpy as np

from gdistill import compiled_samplers, storage
from gdistill.eval import features, sweep
from gdistill.metric_writer import log

DEFAULT_NUM_SAMPLES = 500
DEFAULT_NUM_STEPS = 32
DEFAULT_W = (0.0, 1.0)
METRICS = ('fid', 'is', 'precision', 'recall')


def w_key(metric: str, w: float) -> str:
  """``fid``, 0.0 -> ``fid_w0``; 1.0 -> ``fid_w1``; 0.3 -> ``fid_w0.3``."""
  return f'{metric}_w{float(w):g}'


class QuickFid:
  """FID (and IS, precision, recall) of one parameter tree at a few ``w``, built once.

  Args:
    feature_net: ``features.FeatureNet`` (the Fashion-MNIST classifier, Inception-v3, or
      any ``fn(uint8 images) -> (features, logits)``).
    reference: real-data statistics from ``features.split_statistics`` (``mu``, ``sigma``,
      ``subset_features`` for precision/recall).
    sample_fn: ``fn(params, label, w, z_1, num_steps, rng) -> images in [-1, 1]``, e.g.
      ``ModelStore.sampler('guided')``.
    image_shape, num_classes: of the data.
    num_samples: images per ``w``.
    batch_size: images per sampler call (must split over ``batch_sharding``'s devices).
    num_steps: sampler steps (a guided teacher spends 2 network evaluations per step).
    w_values: guidance weights to score.
    seed: of the fixed labels and noise (``sweep.batch_inputs``).
    batch_sharding: where labels and noise go (``sharding.batch_sharding(mesh)``), or None.
      ``params`` passed to ``__call__`` must already be placed to fit it.
    mode: ``guided``, ``student`` or ``conditional``: recorded (as ``nfe``) only.
    k: nearest neighbours of precision/recall.
  """

  def __init__(self, *, feature_net: features.FeatureNet, reference: dict, sample_fn: Callable,
               image_shape: Sequence[int], num_classes: int,
               num_samples: int = DEFAULT_NUM_SAMPLES, batch_size: int = 100,
               num_steps: int = DEFAULT_NUM_STEPS, w_values: Sequence[float] = DEFAULT_W,
               seed: int = 0, batch_sharding=None, mode: str = 'guided', k: int = 3):
    missing = [key for key in ('mu', 'sigma', 'subset_features') if key not in reference]
    if missing:
      raise ValueError(f'reference lacks {missing} (expected features.split_statistics output)')
    if num_samples < 2 or batch_size < 1 or num_steps < 1 or not w_values:
      raise ValueError(f'QuickFid: num_samples={num_samples} (>= 2), batch_size={batch_size} '
                       f'(>= 1), num_steps={num_steps} (>= 1), w_values={tuple(w_values)} '
                       f'(at least one) expected')
    if len({w_key('fid', w) for w in w_values}) != len(tuple(w_values)):
      raise ValueError(f'w_values={tuple(w_values)}: repeated values')
    self.feature_net, self.reference, self.sample_fn = feature_net, reference, sample_fn
    self.image_shape, self.num_classes = tuple(int(s) for s in image_shape), int(num_classes)
    self.num_samples, self.batch_size, self.num_steps = num_samples, batch_size, num_steps
    self.w_values = tuple(float(w) for w in w_values)
    self.seed, self.batch_sharding, self.mode, self.k = seed, batch_sharding, mode, k
    self.nfe = num_steps * compiled_samplers.nfe_per_step(mode)
    self.compile_seconds = None
    self.last_images = {}  # w -> the images of the latest call (for grids)

  def protocol(self) -> dict:
    """What the numbers depend on (besides the parameters): compare curves only when
    this and the feature network's fingerprint agree."""
    return {'num_samples': self.num_samples, 'batch_size': self.batch_size,
            'num_steps': self.num_steps, 'nfe': self.nfe, 'mode': self.mode,
            'w_values': list(self.w_values), 'seed': self.seed, 'k': self.k,
            'feature_fingerprint': self.feature_net.fingerprint,
            'reference_examples': int(self.reference.get('n', 0)) or None}

  def _generate(self, params, *, w: float, num_steps: int, num_samples: int):
    return sweep.generate(self.sample_fn, params, w=w, num_steps=num_steps,
                          num_samples=num_samples, batch_size=self.batch_size,
                          num_classes=self.num_classes, image_shape=self.image_shape,
                          seed=self.seed, batch_sharding=self.batch_sharding)

  def __call__(self, params) -> dict:
    """Scores ``params``: ``{'fid_w0', 'is_w0', 'precision_w0', 'recall_w0', ... per w,
    'sample_seconds' (the sampler's time), 'seconds' (the whole call)}``.

    The first call also compiles the sampler (one 1-step batch, outside the timings;
    ``compile_seconds``).
    """
    t_start = time.perf_counter()
    if self.compile_seconds is None:
      self._generate(params, w=self.w_values[0], num_steps=1, num_samples=self.batch_size)
      self.compile_seconds = time.perf_counter() - t_start
      t_start = time.perf_counter()
    out, sample_seconds = {}, 0.0
    for w in self.w_values:
      images, seconds, _ = self._generate(params, w=w, num_steps=self.num_steps,
                                          num_samples=self.num_samples)
      sample_seconds += seconds
      scores = sweep.score(images, self.feature_net, self.reference, k=self.k)
      out.update({w_key(m, w): float(scores[m]) for m in METRICS})
      self.last_images[w] = images
    out['sample_seconds'] = sample_seconds
    out['seconds'] = time.perf_counter() - t_start
    return out


def floor_metrics(floor: dict, reference: dict, *, num_samples: int, k: int = 3) -> dict:
  """``sweep.floor_metrics`` at ``num_samples`` images: real held-out images (the first
  ``num_samples`` of ``floor``'s fixed subset) scored as if they were samples, the best
  quick FID to expect at that sample count."""
  n = min(num_samples, len(floor['subset_features']))
  cut = dict(floor, subset_features=floor['subset_features'][:n],
             subset_logits=floor['subset_logits'][:n])
  return sweep.floor_metrics(cut, reference, k=k)


# ---- a phase's curve -----------------------------------------------------------------------


def estimated_minutes(steps: Sequence[int], times: Sequence[Optional[float]]) -> list:
  """Wall minutes since the phase started at each saved step, or None without timestamps.

  The start is extrapolated back from the first two checkpoints (their seconds per step,
  times the first step); later gaps (a stopped and resumed run) count as they happened.
  """
  pts = [(s, t) for s, t in zip(steps, times) if t is not None]
  if len(pts) < 2 or len(pts) != len(steps):
    return [None] * len(steps)
  (s0, t0), (s1, t1) = pts[0], pts[1]
  rate = (t1 - t0) / max(s1 - s0, 1)
  start = t0 - s0 * rate
  return [(t - start) / 60.0 for _, t in pts]


def checkpoint_curve(quick: QuickFid, directory: str, load_fn: Callable[[int], object], *,
                     steps: Sequence[int], batch_size: Optional[int],
                     previous: Optional[dict] = None,
                     on_row: Optional[Callable[[dict], None]] = None) -> list[dict]:
  """Scores the saved ``steps`` of a phase directory.

  Args:
    quick: the QuickFid.
    directory: the phase directory (for timestamps).
    load_fn: ``step -> params`` (``teacher_file.load_step_params`` with the network's
      abstract parameters).
    steps: which saved steps to score.
    batch_size: the phase's training batch (images seen = step * batch_size).
    previous: {step: row} already scored under the same protocol (reused, not resampled).
    on_row: called with each new row (e.g. to write the JSON as the curve grows).
  Returns:
    One row per step: step, images_seen, time, minutes, and the QuickFid numbers.
  """
  from gdistill import teacher_file  # pylint: disable=g-import-not-at-top
  every = teacher_file.phase_steps(directory)
  times = teacher_file.step_times(directory, every)
  minutes = dict(zip(every, estimated_minutes(every, [times[s] for s in every])))
  rows = []
  for i, step in enumerate(steps):
    row = dict((previous or {}).get(step) or {})
    if not row:
      t0 = time.perf_counter()
      row = quick(load_fn(step))
      log(f'quick FID {i + 1}/{len(steps)}: step {step}: '
          + '  '.join(f'w={w:g} FID {row[w_key("fid", w)]:.3f}' for w in quick.w_values)
          + f'  ({time.perf_counter() - t0:.0f}s)')
    row.update(step=int(step), images_seen=None if batch_size is None else int(step) * batch_size,
               time=times.get(step), minutes=minutes.get(step))
    rows.append(row)
    if on_row is not None:
      on_row(row)
  return rows


def table(rows: Sequence[dict], w_values: Sequence[float]) -> str:
  """The curve as a text table (step, images, minutes, FID and IS per w)."""
  head = ['step', 'images', 'minutes'] + [w_key(m, w) for w in w_values for m in ('fid', 'is')]
  lines = ['  '.join(f'{h:>10}' for h in head)]
  for r in rows:
    cells = [f'{r["step"]:>10d}',
             f'{r["images_seen"]:>10,}' if r.get('images_seen') is not None else f'{"-":>10}',
             f'{r["minutes"]:>10.1f}' if r.get('minutes') is not None else f'{"-":>10}']
    cells += [f'{r[w_key(m, w)]:>10.3f}' for w in w_values for m in ('fid', 'is')]
    lines.append('  '.join(cells))
  return '\n'.join(lines)


def _interp(v, xs, ys):
  """Piecewise-linear through (xs, ys), extended linearly past both ends."""
  v = np.asarray(v, float)
  y = np.interp(v, xs, ys)
  lo, hi = (ys[1] - ys[0]) / (xs[1] - xs[0]), (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
  y = np.where(v < xs[0], ys[0] + (v - xs[0]) * lo, y)
  return np.where(v > xs[-1], ys[-1] + (v - xs[-1]) * hi, y)


def plot_curve(rows: Sequence[dict], path: str, *, w_values: Sequence[float],
               floor: Optional[dict] = None, title: str = '') -> str:
  """FID against images seen (log FID axis), a line per w, the real-data floor dashed,
  and minutes on a top axis when the rows carry them."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = sorted(rows, key=lambda r: r['step'])
  use_images = all(r.get('images_seen') is not None for r in rows)
  x = [r['images_seen'] if use_images else r['step'] for r in rows]
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for w in w_values:
    pts = [(xi, r[w_key('fid', w)]) for xi, r in zip(x, rows)
           if math.isfinite(r.get(w_key('fid', w), float('nan')))]
    if pts:
      ax.plot(*zip(*pts), marker='o', label=f'w={w:g}')
  if floor and math.isfinite(floor.get('fid', float('nan'))):
    ax.axhline(floor['fid'], color='gray', ls='--',
               label=f'floor ({floor.get("split", "held-out")}, {floor["num_samples"]} images)')
  ax.set_xlabel('images seen' if use_images else 'step')
  ax.set_ylabel('FID')
  ax.set_yscale('log')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend()
  minutes = [r.get('minutes') for r in rows]
  if len(rows) >= 2 and all(m is not None for m in minutes) and \
      all(b > a for a, b in zip(x, x[1:])) and all(b > a for a, b in zip(minutes, minutes[1:])):
    xs, ms = np.asarray(x, float), np.asarray(minutes, float)
    top = ax.secondary_xaxis('top', functions=(lambda v: _interp(v, xs, ms),
                                               lambda m: _interp(m, ms, xs)))
    top.set_xlabel('minutes of training (from checkpoint times)')
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  storage.write_with(path, lambda f: fig.savefig(f, format='png', dpi=110))
  plt.close(fig)
  return path
