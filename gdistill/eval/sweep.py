"""The evaluation sweep: sample every setting of the plan, score it, write the report.

Stage ``eval`` of the driver and ``python -m gdistill.evaluate`` both call
``run_sweep(config, store)`` with the run's ``gdistill.model_store.ModelStore``
(its workdir, mesh, finished models and compiled samplers). Sampling is the cost, so:
  * one compiled sampler per (mode, sampler) serves every row (the step count and
    w are traced arguments; params of equal shapes reuse the executable);
  * samples come in fixed-size batches (the last one padded), sharded over the mesh;
  * every row uses the same labels (i mod K) and noise z_1 (common random numbers:
    differences between rows are not sampling noise of z_1);
  * finished rows are kept in DIR/eval/report.json and reused when the sweep is
    rerun or extended (new w, steps or models) under the same protocol.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from gdistill import checkpoint, config_validation, loop, run_plan, sharding
from gdistill.compiled_samplers import to_host
from gdistill.data import open_source
from gdistill.eval import features, metrics, plan, plots, report
from gdistill.grids import save_grid
from gdistill.metric_writer import log
from gdistill.model_store import resolve_path

EVAL_DIR = 'eval'


def batch_inputs(b: int, *, batch_size: int, num_classes: int, image_shape, seed: int):
  """Labels [B] (sample i has label i mod K), z_1 [B, H, W, C] and the sampler rng of batch b.

  A function of (seed, b) only, so every row of the sweep sees the same inputs.
  """
  label = (b * batch_size + jnp.arange(batch_size, dtype=jnp.int32)) % num_classes
  key = jax.random.PRNGKey(seed)
  z_1 = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 0), b),
                          (batch_size, *image_shape))
  return label, z_1, jax.random.fold_in(jax.random.fold_in(key, 1), b)


def generate(sample_fn, params, *, w: float, num_steps: int, num_samples: int, batch_size: int,
             num_classes: int, image_shape, seed: int, batch_sharding=None, name: str = ''):
  """``num_samples`` images (float [n, H, W, C] in [-1, 1]) and the sampling seconds.

  Runs ceil(n / B) batches of B (the last one padded); the seconds cover every
  batch, each waited on (``block_until_ready``) before the next is queued.
  """
  num_batches = -(-num_samples // batch_size)
  out, seconds, last_log = [], 0.0, time.perf_counter()
  for b in range(num_batches):
    label, z_1, rng = batch_inputs(b, batch_size=batch_size, num_classes=num_classes,
                                   image_shape=image_shape, seed=seed)
    if batch_sharding is not None:
      label, z_1 = jax.device_put(label, batch_sharding), jax.device_put(z_1, batch_sharding)
    t0 = time.perf_counter()
    x = sample_fn(params, label, jnp.float32(w), z_1, jnp.int32(num_steps), rng)
    x.block_until_ready()
    seconds += time.perf_counter() - t0
    out.append(to_host(x))
    if name and time.perf_counter() - last_log > 30 and b + 1 < num_batches:
      last_log = time.perf_counter()
      log(f'eval:   {name}: batch {b + 1}/{num_batches} '
          f'({seconds / (b + 1):.1f} s/batch)')
  return np.concatenate(out)[:num_samples], seconds, num_batches * batch_size


def score(images, net: features.FeatureNet, reference: dict, *, k: int) -> dict:
  """FID, IS (10 splits), precision/recall of float images against the reference stats."""
  feats, logits = net.fn(metrics.quantize_uint8(images))
  mu, sigma = metrics.feature_statistics(feats)
  fid = metrics.frechet_distance(mu, sigma, reference['mu'], reference['sigma'])
  is_mean, is_std = metrics.inception_score(logits, num_splits=plan.IS_SPLITS)
  precision, recall = metrics.precision_recall(reference['subset_features'], feats, k=k)
  return {'fid': fid, 'is': is_mean, 'is_std': is_std, 'precision': precision,
          'recall': recall}


def floor_metrics(floor: dict, reference: dict, *, k: int) -> dict:
  """The real held-out split scored as if it were samples: the best FID to expect.

  ``fid`` uses the same number of images as a row (so its small-sample bias matches
  the rows'); ``fid_full`` the whole split.
  """
  sub = floor['subset_features']
  mu, sigma = metrics.feature_statistics(sub)
  is_mean, is_std = metrics.inception_score(floor['subset_logits'], num_splits=plan.IS_SPLITS)
  precision, recall = metrics.precision_recall(reference['subset_features'], sub, k=k)
  return {'fid': metrics.frechet_distance(mu, sigma, reference['mu'], reference['sigma']),
          'fid_full': metrics.frechet_distance(floor['mu'], floor['sigma'], reference['mu'],
                                               reference['sigma']),
          'is': is_mean, 'is_std': is_std, 'precision': precision, 'recall': recall,
          'num_samples': int(sub.shape[0]), 'num_full': int(floor['n'])}


def save_class_grid(images, path: str, *, num_classes: int, per_class: int,
                    max_classes: int) -> None:
  """A row per class (the first ``max_classes``), up to ``per_class`` samples each.

  Sample i has label i mod K, so class c's samples are images[c::K].
  """
  rows = min(num_classes, max_classes)
  cols = min([per_class] + [len(images[c::num_classes]) for c in range(rows)])
  save_grid(np.stack([images[c::num_classes][:cols] for c in range(rows)]), path)


def _source(config, split: str, train_source):
  if split == config.data.split and train_source is not None:
    return train_source
  return open_source(config.data.name, split=split, data_dir=config.data.data_dir or None,
                     download=config.data.download)


class _Params:
  """Loads each phase's sampling params once, keeping only the latest in memory."""

  def __init__(self, store):
    self.store = store
    self._phase, self._params = None, None

  def get(self, phase: str):
    if phase != self._phase:
      self._params = None
      self._params = self.store.load(phase, purpose='eval').params
      self._phase = phase
    return self._params


def feature_net_and_stats(config, eval_dir: str, train_source):
  """The evaluation's feature network (trained and saved under ``eval_dir`` when it is
  gdistill's classifier and absent) and the cached real-data statistics of the
  reference and floor splits: (net, {'reference': ..., 'floor': ...})."""
  e = config.eval
  net = features.make_feature_net(
      kind=plan.feature_net_kind(e.feature_net, config.data.name), eval_dir=eval_dir,
      train_source=train_source,
      test_source=_source(config, config.data.eval_split, train_source),
      classifier_path=resolve_path(e.classifier_path) if e.classifier_path else '',
      classifier_steps=e.classifier_steps,
      classifier_batch_size=e.classifier_batch_size,
      classifier_learning_rate=e.classifier_learning_rate, inception_weights=e.inception_weights,
      seed=e.seed)
  stats = {}
  for role, split, cap in (('reference', e.reference_split, e.reference_examples),
                           ('floor', e.floor_split or config.data.eval_split, 0)):
    stats[role] = features.split_statistics(
        net, _source(config, split, train_source),
        cache_path=os.path.join(eval_dir, f'stats_{net.kind}_{split}.npz'),
        subset_size=e.num_samples, max_examples=cap, seed=e.seed)
  return net, stats


def _shipped_teacher_rows(config, store, fingerprint: str) -> list[dict]:
  """The teacher file's shipped rows (``eval.teacher_rows``) when they fit this run."""
  path = config.eval.get('teacher_rows', '')
  teacher = store.directory(run_plan.TEACHER) if config.get('teacher_checkpoint', '') else ''
  if not path or not os.path.isfile(teacher):
    return []
  from gdistill.eval import teacher_rows  # pylint: disable=g-import-not-at-top
  rows = teacher_rows.load_matching(resolve_path(path), fingerprint=fingerprint,
                                    sha256=teacher_rows.teacher_sha256(teacher))
  if rows:
    log(f'eval: {len(rows)} teacher rows from {path} (measured for this teacher file under '
        f'this protocol; --config.eval.teacher_rows= samples them here)')
  return rows


def _eta(seconds: float) -> str:
  return f'{int(seconds // 60)}m{int(seconds % 60):02d}s'


def run_sweep(config, store, *, train_source=None) -> dict:
  """Evaluates every setting of ``config.eval`` on the finished checkpoints of ``store``.

  Writes DIR/eval/report.json, report.md, the plots and a sample grid per row.
  ``train_source``: the training split's data source, if already open.

  Returns:
    The report dict ({'protocol', 'floor', 'claims', 'rows'}).
  """
  workdir = store.path
  e = config.eval
  config_validation.validate_eval(config, num_devices=store.mesh.size)
  eval_dir = os.path.join(workdir, EVAL_DIR)
  t_start = time.perf_counter()
  is_main = jax.process_index() == 0

  # ---- which checkpoints exist ---------------------------------------------------------
  students, missing = [], []
  for spec in store.plan.distilled():
    (students if store.step(spec.name) is not None else missing).append(spec)
  missing = [p.name for p in missing]
  if missing:
    log(f'eval: no finished checkpoint for {", ".join(missing)}: those students are skipped')
  settings = plan.plan_from_config(e, students)
  params = _Params(store)
  ckpt = {}
  for phase in sorted({s.phase for s in settings}):
    step = store.step(phase)
    if step is None:
      raise checkpoint.CheckpointError(f'checkpoint {store.directory(phase)}: nothing to '
                                       f'evaluate there (eval.models={tuple(e.models)})')
    meta = store.meta(phase)
    ckpt[phase] = {'step': int(step), 'weights': 'ema' if meta.get('has_ema') else 'raw'}

  # ---- feature network and real-data statistics -------------------------------------------
  train_source = _source(config, config.data.split, train_source)
  net, stats = feature_net_and_stats(config, eval_dir, train_source)
  floor_split = e.floor_split or config.data.eval_split
  k = e.precision_recall_k
  floor = dict(floor_metrics(stats['floor'], stats['reference'], k=k), split=floor_split)
  log(f'eval: floor ({floor_split} split vs {e.reference_split} statistics): '
      f'FID {floor["fid"]:.3f} at {floor["num_samples"]} images, {floor["fid_full"]:.3f} at '
      f'{floor["num_full"]}; IS {floor["is"]:.3f} (set-up took '
      f'{time.perf_counter() - t_start:.0f}s)')

  protocol = report.make_protocol(
      config=config, num_classes=store.num_classes, image_shape=store.image_shape,
      feature_net=net.info, reference_examples=stats['reference']['n'], checkpoints=ckpt,
      missing=missing, num_devices=store.mesh.size)
  protocol.update(store.codec_meta())  # a latent run: samples decoded by this autoencoder
  fingerprint = report.fingerprint(protocol, net.fingerprint)
  protocol['fingerprint'] = fingerprint
  previous = report.reusable_rows(os.path.join(eval_dir, report.JSON_NAME), fingerprint)
  kept = {plan.row_key(r['model'], r['steps'], r['sampler'], r['w']): r for r in previous}
  wanted = {s.key: s for s in settings}
  for r in _shipped_teacher_rows(config, store, fingerprint):
    key = plan.row_key(r['model'], r['steps'], r['sampler'], r['w'])
    if key in wanted and key not in kept:
      kept[key] = dict(r, checkpoint=f'{wanted[key].phase}@{ckpt[wanted[key].phase]["step"]}')

  training = report.training_costs(loop.read_costs(workdir),
                                   {p.name: p.kind for p in store.plan.phases})

  # ---- the rows --------------------------------------------------------------------
  todo = [s for s in settings
          if kept.get(s.key, {}).get('checkpoint') != f'{s.phase}@{ckpt[s.phase]["step"]}']
  log(f'eval: {len(settings)} settings, {len(settings) - len(todo)} already in the report, '
      f'{len(todo)} to sample ({e.num_samples} samples each, batches of {e.batch_size}); '
      f'{sum(s.nfe for s in todo) * e.num_samples:,} network evaluations')
  warm, done_evals, done_seconds = set(), 0, 0.0
  batch_sharding = sharding.batch_sharding(store.mesh)
  gen_kw = dict(num_samples=e.num_samples, batch_size=e.batch_size,
                num_classes=store.num_classes, image_shape=store.image_shape, seed=e.seed,
                batch_sharding=batch_sharding)
  for i, s in enumerate(todo):
    fn = store.sampler(s.mode, s.sampler)
    p = params.get(s.phase)
    if (s.mode, s.sampler) not in warm:  # compile outside the timed batches
      t0 = time.perf_counter()
      generate(fn, p, w=s.w, num_steps=1, **dict(gen_kw, num_samples=e.batch_size))
      log(f'eval: {s.mode}/{s.sampler} sampler ready (compiled, one batch run) in '
          f'{time.perf_counter() - t0:.1f}s')
      warm.add((s.mode, s.sampler))
    images, seconds, sampled = generate(fn, p, w=s.w, num_steps=s.steps, name=s.label,
                                        **gen_kw)
    row = {'model': s.model, 'steps': s.steps, 'nfe': s.nfe, 'sampler': s.sampler,
           'w': float(s.w), **score(images, net, stats['reference'], k=k),
           'num_samples': e.num_samples, 'seconds_per_image': seconds / sampled,
           'checkpoint': f'{s.phase}@{ckpt[s.phase]["step"]}',
           'weights': ckpt[s.phase]['weights']}
    kept[s.key] = row
    if is_main:
      save_class_grid(images, os.path.join(eval_dir, 'samples', f'{s.slug}.png'),
                      num_classes=store.num_classes, per_class=e.grid_per_class,
                      max_classes=config.samples.max_classes)
      report.write(eval_dir, protocol=protocol, floor=floor, rows=list(kept.values()),
                   training=training)
    done_evals += s.nfe * sampled
    done_seconds += seconds
    rate = done_evals / max(done_seconds, 1e-9)
    left = sum(t.nfe for t in todo[i + 1:]) * sampled / rate
    log(f'eval {i + 1}/{len(todo)} {s.label}: FID {row["fid"]:.3f} IS {row["is"]:.3f} '
        f'P {row["precision"]:.3f} R {row["recall"]:.3f}  '
        f'{row["seconds_per_image"] * 1e3:.2f} ms/image  {rate:.0f} evals/s  ETA {_eta(left)}')

  rows = list(kept.values())
  if not is_main:
    return report.build(protocol=protocol, floor=floor, rows=rows, training=training)
  out = report.write(eval_dir, protocol=protocol, floor=floor, rows=rows, training=training)
  for path in plots.write_all(eval_dir, out):
    log(f'wrote {path}')
  log(f'eval: wrote {os.path.join(eval_dir, report.MD_NAME)} ({len(rows)} rows) in '
      f'{_eta(time.perf_counter() - t_start)}')
  return out
