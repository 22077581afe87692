"""Why does the guided teacher's long DDIM score worse than short samplers? A sampler study.

  python benchmarks/sampler_study.py --workdir=/work/runs/teacher_a --step=1500 \\
      --eval_dir=/work/runs/study/eval --num_samples=250 --output=/work/runs/study/s1500.json

Scores one teacher checkpoint, guided DDIM (2 network evaluations per step), over:
  * steps N (16, 64, 256), x_hat clipped to [-1, 1] at every step or not;
  * weights: ``ema`` (what the sampler uses), ``raw`` (the trained parameters) and
    ``ema_debiased`` = (ema - d^s p_0) / (1 - d^s): the EMA with the share of the
    initial parameters p_0 (re-created from the run's seed) removed, i.e. the EMA as if
    it had been started with bias correction (Adam-style) or zero-debiasing;
  * time grids (as log-SNR sequences lambda_0 = start .. lambda_N = end):
      uniform_t       t_i = 1 - i / N (what ``gdistill.samplers.ddim_sample`` does)
      logsnr_uniform  lambda uniform in [lambda(1), lambda(0)] = [-20, 20]
      logsnr_mid      lambda(1) = -20, then uniform in [-10, 10], last step to lambda(0) = 20
      stop_t64        uniform t from 1 down to t = 1/64 in N - 1 steps, then one step to 0
                      (the last x_hat is taken at t = 1/64, where a 64-step DDIM takes it)
      start_t0.98     uniform t from 0.98 (z_1 treated as z at t = 0.98) to 0.

Every row uses the same labels and noise (``gdistill.eval.sweep.generate``, common random
numbers) and the sweep's own scoring (``sweep.score``: FID / IS / precision / recall in
the run's feature network); the real-data floor is given at the same sample count.
The sampler is this script's own ``lax.fori_loop`` DDIM over ``gdistill.diffusion`` (the
grid is an argument, so one compilation serves every row); ``--check`` first confirms
that its ``uniform_t`` grid reproduces ``gdistill.compiled_samplers``' DDIM.

Writes the JSON after every row (rerunning with the same protocol skips rows already
there) and prints a table. ``--rows`` picks rows by regular expression over their names
(``ema/N64/clip/uniform_t/w0``); ``--budget_minutes`` stops before a row that would not
fit (estimated from the measured evaluation rate).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from gdistill import cli_setup  # pylint: disable=g-import-not-at-top,wrong-import-position  # before jax

MAX_STEPS = 256
GRIDS = ('uniform_t', 'logsnr_uniform', 'logsnr_mid', 'stop_t64', 'start_t0.98')
WEIGHTS = ('ema', 'raw', 'ema_debiased')

# (weights, steps, clip, grid, w) in priority order: clip, EMA vs raw, debiased EMA, grids, w=1.
DEFAULT_ROWS = (
    [('ema', n, c, 'uniform_t', 0.0) for n in (64, 256) for c in (True, False)]
    + [('raw', n, c, 'uniform_t', 0.0) for n in (64, 256) for c in (True, False)]
    + [('ema_debiased', n, True, 'uniform_t', 0.0) for n in (64, 256)]
    + [(wt, 16, c, 'uniform_t', 0.0) for wt in WEIGHTS for c in (True, False)]
    + [(wt, n, True, g, 0.0) for wt in ('ema', 'raw')
       for g in ('logsnr_uniform', 'stop_t64', 'logsnr_mid', 'start_t0.98') for n in (64, 256)]
    + [(wt, n, True, 'uniform_t', 1.0) for wt in ('ema', 'raw') for n in (16, 64, 256)]
)


def row_name(weights, steps, clip, grid, w) -> str:
  return f'{weights}/N{steps}/{"clip" if clip else "noclip"}/{grid}/w{w:g}'


def logsnr_grid(name: str, n: int):
  """The log-SNR at each of the n + 1 points of grid ``name`` (start first), float64."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gdistill import diffusion  # pylint: disable=g-import-not-at-top
  lam = lambda t: np.asarray(diffusion.logsnr_schedule_cosine(np.asarray(t, np.float32)),
                             np.float64)
  i = np.arange(n + 1, dtype=np.float64)
  if name == 'uniform_t':
    # As samplers.ddim_sample computes it (float32 t), so the rows agree to rounding.
    return lam(((np.float32(n) - i.astype(np.float32)) / np.float32(n)))
  if name == 'logsnr_uniform':
    return np.linspace(diffusion.LOGSNR_MIN, diffusion.LOGSNR_MAX, n + 1)
  if name == 'logsnr_mid':
    if n < 2:
      return np.array([diffusion.LOGSNR_MIN, diffusion.LOGSNR_MAX][:n + 1])
    return np.concatenate([[diffusion.LOGSNR_MIN], np.linspace(-10.0, 10.0, n - 1),
                           [diffusion.LOGSNR_MAX]])
  if name == 'stop_t64':
    t = np.concatenate([np.linspace(1.0, 1.0 / 64, n), [0.0]]) if n > 1 else np.array([1., 0.])
    return lam(t)
  if name == 'start_t0.98':
    return lam(0.98 * (n - i) / n)
  raise ValueError(f'grid={name!r}: expected one of {GRIDS}')


class _Apply:
  """A bare apply function as the ``net.apply`` of ``for_gdistill_net``."""

  def __init__(self, apply):
    self.apply = apply


def make_study_sampler(*, apply_fn, mean_type: str, num_classes: int, guided: bool = True):
  """jitted ``fn(params, label, w, z_1, num_steps, lam [MAX_STEPS + 1], clip) -> x_hat``:
  guided DDIM over an arbitrary log-SNR grid (2 network evaluations per step).

  ``guided=False``: the conditional branch only (w ignored), 1 evaluation per step. At
  w = 0 the guided prediction (1 + 0) x_cond - 0 x_uncond is x_cond, so this is the guided
  sampler at w = 0 for half the cost (``--check`` measures the difference: float rounding).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from gdistill import diffusion  # pylint: disable=g-import-not-at-top
  from gdistill.denoiser import for_gdistill_net  # pylint: disable=g-import-not-at-top
  net = for_gdistill_net(_Apply(apply_fn), mean_type=mean_type, num_classes=num_classes)

  @jax.jit
  def fn(params, label, w, z_1, num_steps, lam, clip):
    b = z_1.shape[0]
    wb = jnp.broadcast_to(w, (b,))

    def step(i, carry):
      z_t, _ = carry
      lt, ls = lam[i], lam[i + 1]
      logsnr = jnp.broadcast_to(lt, (b,))
      # The cosine path's network time is lambda itself: t is not used.
      if guided:
        x_hat = net.guided_x_hat(params, z_t, t=logsnr, logsnr=logsnr, cond=label, w=wb)
      else:
        x_hat = net.x_hat(params, z_t, t=logsnr, logsnr=logsnr, cond=label)
      x_hat = jnp.where(clip, jnp.clip(x_hat, -1.0, 1.0), x_hat)
      return diffusion.ddim_step(z_t=z_t, x_hat=x_hat, logsnr_t=lt, logsnr_s=ls), x_hat

    _, x_hat = jax.lax.fori_loop(0, num_steps, step, (z_1, jnp.zeros_like(z_1)))
    return x_hat
  return fn


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True, help='workdir of a gdistill run with a teacher')
  p.add_argument('--step', type=int, default=None, help='teacher checkpoint step (default latest)')
  p.add_argument('--eval_dir', required=True,
                 help='where the feature classifier and real-data statistics live (made once)')
  p.add_argument('--num_samples', type=int, default=250)
  p.add_argument('--batch_size', type=int, default=250,
                 help='samples per sampler call; a multiple of the device count')
  p.add_argument('--seed', type=int, default=0, help='of the fixed labels and noise')
  p.add_argument('--rows', default='',
                 help='regular expression over the default rows\' names (default all)')
  p.add_argument('--extra_rows', default='',
                 help='rows to add after the default ones, in this order, comma-separated '
                      'names weights/N<steps>/clip|noclip/grid/w<w> (--rows=^$ for only these)')
  p.add_argument('--budget_minutes', type=float, default=0.0,
                 help='stop before a row that would end past this (0: no limit)')
  p.add_argument('--check', action='store_true',
                 help='first compare the uniform_t grid with compiled_samplers (8 samples)')
  p.add_argument('--guided_w0', action='store_true',
                 help='sample w = 0 rows with both branches (default: the conditional branch '
                      'only, the same images for half the cost)')
  p.add_argument('--output', required=True, help='JSON file (rows already there are reused)')
  return p.parse_args(argv)


def parse_row(name: str):
  m = re.fullmatch(r'(\w+)/N(\d+)/(clip|noclip)/([\w.]+)/w([\d.]+)', name.strip())
  if not m or m.group(1) not in WEIGHTS or m.group(4) not in GRIDS or \
      not 1 <= int(m.group(2)) <= MAX_STEPS:
    cli_setup.fail(f'row {name!r}: expected weights/N<steps>/clip|noclip/grid/w<w> with '
                   f'weights in {WEIGHTS}, grid in {GRIDS}, steps <= {MAX_STEPS}')
  return (m.group(1), int(m.group(2)), m.group(3) == 'clip', m.group(4), float(m.group(5)))


def _write_json(path: str, data: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def table(rows, floor) -> str:
  head = f'{"row":<36} {"NFE":>5} {"FID":>8} {"IS":>6} {"prec":>6} {"rec":>6} {"min":>5}'
  lines = [head]
  for r in rows:
    lines.append(f'{r["name"]:<36} {r["nfe"]:>5d} {r["fid"]:>8.3f} {r["is"]:>6.3f} '
                 f'{r["precision"]:>6.3f} {r["recall"]:>6.3f} {r["seconds"] / 60:>5.1f}')
  lines.append(f'{"real-data floor (" + str(floor["num_samples"]) + " images)":<36} {"":>5} '
               f'{floor["fid"]:>8.3f} {floor["is"]:>6.3f} {floor["precision"]:>6.3f} '
               f'{floor["recall"]:>6.3f}')
  return '\n'.join(lines)


def load_params(directory, abstract, step, which):
  """``teacher_file.load_step_params`` restoring ``which`` ('params' or 'ema_params')."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from gdistill import checkpoint  # pylint: disable=g-import-not-at-top
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(
      sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), abstract)
  mgr = checkpoint.manager(directory, create=False)
  try:
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={which: abstract}, restore_args={which: restore_args}, partial_restore=True)))
  finally:
    mgr.close()
  return restored.state[which]


def run(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from gdistill import checkpoint, compiled_samplers, model_store, networks, sharding, teacher_file  # pylint: disable=g-import-not-at-top
  from gdistill.data import open_source  # pylint: disable=g-import-not-at-top
  from gdistill.eval import quick_fid, sweep  # pylint: disable=g-import-not-at-top
  from gdistill.metric_writer import log  # pylint: disable=g-import-not-at-top

  t_start = time.perf_counter()
  workdir = os.path.abspath(args.workdir)
  config = model_store.load_config(workdir)
  directory = checkpoint.phase_dir(workdir, 'teacher')
  steps = teacher_file.phase_steps(directory)
  step = steps[-1] if args.step is None else args.step
  if step not in steps:
    cli_setup.fail(f'--step={step}: not saved in {directory} (saved: {steps})')
  meta = checkpoint.read_meta(directory, step)
  ema_decay = float(config.teacher.ema_decay)
  num_classes = int(meta['num_classes'])
  image_shape = tuple(int(s) for s in meta['image_shape'])
  mesh = sharding.make_mesh({'data': -1})
  if args.batch_size % mesh.size:
    cli_setup.fail(f'--batch_size={args.batch_size}: not a multiple of {mesh.size} devices')
  store = model_store.ModelStore(workdir, config, mesh=mesh, image_shape=image_shape,
                                 num_classes=num_classes)
  net = store.net(use_w=False)
  abstract = store.abstract_params(use_w=False)
  mean_type = config.diffusion.mean_type

  names = [row_name(*r) for r in DEFAULT_ROWS]
  if args.rows:
    names = [n for n in names if re.search(args.rows, n)]
  names += [n.strip() for n in args.extra_rows.split(',') if n.strip()]
  todo_specs = [parse_row(n) for n in dict.fromkeys(names)]

  # ---- parameters ----------------------------------------------------------------------
  params = {}
  need = {s[0] for s in todo_specs} | {'ema', 'raw'}
  params['ema'] = load_params(directory, abstract, step, 'ema_params')
  params['raw'] = load_params(directory, abstract, step, 'params')
  init = jax.device_put(networks.init_params(net, jax.random.PRNGKey(int(config.seed)),
                                             image_shape), sharding.replicated(mesh))
  share = ema_decay ** step  # weight of the initial parameters in the EMA
  if 'ema_debiased' in need:
    params['ema_debiased'] = jax.tree.map(lambda e, p0: (e - share * p0) / (1.0 - share),
                                          params['ema'], init)

  def dist(a, b):
    return float(math.sqrt(sum(float(jnp.sum(jnp.square(x - y)))
                               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))))
  distances = {'ema-raw': dist(params['ema'], params['raw']),
               'init-raw': dist(init, params['raw'])}
  if 'ema_debiased' in params:
    distances['ema_debiased-raw'] = dist(params['ema_debiased'], params['raw'])
  log(f'study: teacher step {step}, EMA decay {ema_decay}: initial parameters weigh '
      f'{share:.3f} in the EMA; parameter distances {distances}')

  # ---- feature network, real-data statistics, floor ----------------------------------------
  train_source = open_source(config.data.name, split=config.data.split,
                             data_dir=config.data.data_dir or None, download=config.data.download)
  with config.unlocked():
    config.eval.num_samples = max(config.eval.num_samples, args.num_samples)
  feat_net, stats = sweep.feature_net_and_stats(config, args.eval_dir, train_source)
  k = config.eval.precision_recall_k
  floor = quick_fid.floor_metrics(stats['floor'], stats['reference'],
                                  num_samples=args.num_samples, k=k)

  # ---- the sampler ---------------------------------------------------------------------------
  aots = {g: compiled_samplers.AotSampler(
      make_study_sampler(apply_fn=net.apply, mean_type=mean_type, num_classes=num_classes,
                         guided=g),
      name=f'study {"guided" if g else "w=0 (conditional)"}/ddim', log=log,
      compile_options=store.compile_options) for g in (True, False)}
  repl = sharding.replicated(mesh)
  batch_sh = sharding.batch_sharding(mesh)

  def grid_array(grid, n):
    lam = logsnr_grid(grid, n)
    lam = np.concatenate([lam, np.full(MAX_STEPS + 1 - len(lam), lam[-1])]).astype(np.float32)
    return jax.device_put(jnp.asarray(lam), repl)

  def sample_fn_for(grid, n, clip, w=1.0):
    lam, clip_arr = grid_array(grid, n), jax.device_put(jnp.bool_(clip), repl)
    aot = aots[bool(w != 0.0 or args.guided_w0)]
    return lambda p, label, w, z_1, num_steps, rng: aot(p, label, jax.device_put(w, repl), z_1,
                                                        jax.device_put(num_steps, repl), lam,
                                                        clip_arr)

  gen_kw = dict(batch_size=args.batch_size, num_classes=num_classes, image_shape=image_shape,
                seed=args.seed, batch_sharding=batch_sh)
  t0 = time.perf_counter()
  for w in (0.0, 1.0):
    sweep.generate(sample_fn_for('uniform_t', 1, True, w), params['ema'], w=w, num_steps=1,
                   num_samples=args.batch_size, **gen_kw)
  log(f'study: sampler compiled and one batch run in {time.perf_counter() - t0:.1f}s')

  check = None
  if args.check:
    from gdistill.denoiser import for_gdistill_net  # pylint: disable=g-import-not-at-top
    ref = compiled_samplers.make_sample_fn(
        for_gdistill_net(net, mean_type=mean_type, num_classes=num_classes), mode='guided',
        sampler='ddim')
    nb = mesh.size * 4
    label, z_1, rng = sweep.batch_inputs(0, batch_size=nb, num_classes=num_classes,
                                         image_shape=image_shape, seed=args.seed)
    label, z_1 = jax.device_put(label, batch_sh), jax.device_put(z_1, batch_sh)
    check = {}
    for n in (4, 16):
      a = np.asarray(ref(params['ema'], label, jnp.float32(1.0), z_1, jnp.int32(n), rng))
      b = np.asarray(sample_fn_for('uniform_t', n, True)(params['ema'], label, jnp.float32(1.0),
                                                          z_1, jnp.int32(n), rng))
      check[f'N{n}_w1_max_abs_diff'] = float(np.max(np.abs(a - b)))
      a = np.asarray(ref(params['ema'], label, jnp.float32(0.0), z_1, jnp.int32(n), rng))
      b = np.asarray(sample_fn_for('uniform_t', n, True, 0.0)(
          params['ema'], label, jnp.float32(0.0), z_1, jnp.int32(n), rng))
      check[f'N{n}_w0_conditional_max_abs_diff'] = float(np.max(np.abs(a - b)))
    log(f'study: uniform_t grid vs compiled_samplers ddim: {check}')

  protocol = {'workdir': workdir, 'step': int(step), 'num_samples': args.num_samples,
              'batch_size': args.batch_size, 'seed': args.seed, 'k': k,
              'ema_decay': ema_decay, 'feature_fingerprint': feat_net.fingerprint,
              'devices': mesh.size, 'guided_w0': bool(args.guided_w0)}
  done = {}
  if os.path.isfile(args.output):
    try:
      with open(args.output) as f:
        old = json.load(f)
      if old.get('protocol') == json.loads(json.dumps(protocol)):
        done = {r['name']: r for r in old.get('rows', [])}
    except (OSError, ValueError):
      pass
  out = {'protocol': protocol, 'floor': floor, 'init_share_in_ema': share,
         'param_distances': distances, 'check': check, 'rows': []}
  rate = None  # network evaluations per second

  def kept_rows(rows):
    """Rows of earlier runs (same protocol) that this run does not list: kept in the file."""
    listed = {r['name'] for r in rows} | {row_name(*spec) for spec in todo_specs}
    return [r for key, r in done.items() if key not in listed]
  rows = out['rows']
  for spec in todo_specs:
    name = row_name(*spec)
    weights, n, clip, grid, w = spec
    nfe = 2 * n
    if name in done:
      rows.append(done[name])
      continue
    if args.budget_minutes and rate:
      left = args.budget_minutes * 60 - (time.perf_counter() - t_start)
      evals = nfe if (w != 0.0 or args.guided_w0) else n
      need_s = evals * args.num_samples / rate + 5
      if need_s > left:
        log(f'study: {name} skipped ({need_s / 60:.1f} min needed, {left / 60:.1f} left)')
        continue
    t0 = time.perf_counter()
    images, seconds, sampled = sweep.generate(sample_fn_for(grid, n, clip, w), params[weights],
                                              w=w, num_steps=n, num_samples=args.num_samples,
                                              **gen_kw)
    scores = sweep.score(images, feat_net, stats['reference'], k=k)
    rate = (nfe if (w != 0.0 or args.guided_w0) else n) * sampled / seconds
    row = {'name': name, 'weights': weights, 'steps': n, 'nfe': nfe, 'clip': clip,
           'grid': grid, 'w': w, **{m: float(v) for m, v in scores.items()},
           'seconds': time.perf_counter() - t0, 'evals_per_second': rate,
           'frac_outside_pm1': float(np.mean(np.abs(images) > 1.0))}
    rows.append(row)
    log(f'study: {name}: FID {row["fid"]:.3f} P {row["precision"]:.3f} R {row["recall"]:.3f} '
        f'({row["seconds"]:.0f}s, {rate:.0f} evals/s)')
    _write_json(args.output, dict(out, rows=rows + kept_rows(rows)))
  rows.extend(kept_rows(rows))
  _write_json(args.output, out)
  print(table(rows, floor))
  print(f'step {step}; {args.num_samples} samples per row; initial parameters weigh '
        f'{share:.3f} in the EMA; wrote {args.output}')
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  with cli_setup.user_errors():
    run(args)
  return 0


if __name__ == '__main__':
  sys.exit(main())
