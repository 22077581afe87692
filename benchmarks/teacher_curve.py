"""A phase's quality curve from its saved checkpoints: quick FID against images seen.

  python benchmarks/teacher_curve.py --workdir=runs/fashion_mnist --phase=teacher
  python benchmarks/teacher_curve.py --workdir=DIR --every=2 --num_samples=500 --steps=32

For every saved step of DIR/checkpoints/PHASE (every k-th with --every; the latest
always), the sampling parameters of that step (EMA if kept) are scored with
``gdistill.eval.quick_fid.QuickFid``: NUM_SAMPLES guided-DDIM samples of STEPS steps
(2 network evaluations per step for the teacher; a student's own step count for a
stage-2 student) at each w, the same labels and noise at every step, FID / IS /
precision / recall in the feature space of the run's evaluation (for Fashion-MNIST
gdistill's own classifier, DIR/eval/classifier.npz, trained there in about 2 minutes
if absent; the real-data statistics are the sweep's, cached in DIR/eval/).

Writes PREFIX.json (protocol, the real-data floor at NUM_SAMPLES images, one row per
step), PREFIX.png (FID against images seen = step x batch, minutes of training on a
top axis, estimated from the checkpoints' commit times) and prints a table. PREFIX
defaults to DIR/eval/curve_PHASE. Rerunning reuses the rows of steps already scored
under the same protocol, so it can follow a run that is still training. The number of
steps available is bounded by ``checkpoint.max_to_keep`` (default 2) of the run.

Cost on the 2-core CPU: a guided teacher at 32 steps and 500 samples is 32,000 network
evaluations per w, about 75 s at 430 evaluations/s, so 2.5 minutes per checkpoint at
w = 0 and 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from gdistill import cli_setup  # pylint: disable=g-import-not-at-top,wrong-import-position  # before jax

DEFAULT_STEPS = 32


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True, help='workdir of a gdistill run')
  p.add_argument('--phase', default='teacher', help='phase directory name (default teacher)')
  p.add_argument('--num_samples', type=int, default=500, help='samples per w (default 500)')
  p.add_argument('--steps', type=int, default=None,
                 help=f'sampler steps (default {DEFAULT_STEPS}; a stage-2 student: its own)')
  p.add_argument('--w', default='0,1', help='guidance weights, comma-separated (default 0,1)')
  p.add_argument('--every', type=int, default=1,
                 help='score every k-th saved step (the latest always; default 1)')
  p.add_argument('--batch_size', type=int, default=100,
                 help='samples per sampler call; a multiple of the device count (default 100)')
  p.add_argument('--sampler', default='ddim', choices=('ddim', 'stochastic'))
  p.add_argument('--seed', type=int, default=0, help='of the fixed labels and noise')
  p.add_argument('--classifier_path', default='',
                 help='feature classifier (default: the run\'s eval.classifier_path, else '
                      'DIR/eval/classifier.npz, trained there if absent)')
  p.add_argument('--output', default='', help='output prefix (default DIR/eval/curve_PHASE)')
  args = p.parse_args(argv)
  try:
    args.w_values = tuple(float(w) for w in args.w.split(',') if w.strip())
  except ValueError:
    cli_setup.fail(f'--w={args.w!r}: expected comma-separated numbers, e.g. 0,1')
  for name in ('num_samples', 'every', 'batch_size'):
    if getattr(args, name) < 1:
      cli_setup.fail(f'--{name}={getattr(args, name)}: expected a positive integer')
  if args.num_samples < 2 or not args.w_values or (args.steps is not None and args.steps < 1):
    cli_setup.fail('--num_samples must be >= 2, --steps >= 1 and --w non-empty')
  return args


def select_steps(steps: list[int], every: int) -> list[int]:
  """Every ``every``-th saved step, counted back from the latest (always included)."""
  return sorted(steps[::-1][::every])


def _write_json(path: str, data: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _previous_rows(path: str, protocol: dict) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return {}
  if old.get('protocol') != json.loads(json.dumps(protocol)):
    return {}
  return {int(r['step']): r for r in old.get('rows', [])}


def run(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  from gdistill import checkpoint, model_store, sharding, teacher_file  # pylint: disable=g-import-not-at-top
  from gdistill.data import open_source  # pylint: disable=g-import-not-at-top
  from gdistill.eval import quick_fid, sweep, workdir_config  # pylint: disable=g-import-not-at-top
  from gdistill.metric_writer import log  # pylint: disable=g-import-not-at-top
  from gdistill.workdir import CONFIG_FILE  # pylint: disable=g-import-not-at-top

  workdir = os.path.abspath(args.workdir)
  if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    cli_setup.fail(f'--workdir={args.workdir}: no {CONFIG_FILE} there; expected the workdir of '
                   f'a gdistill run')
  config = workdir_config.get_config(workdir)
  e = config.eval
  directory = checkpoint.phase_dir(workdir, args.phase)
  saved = teacher_file.phase_steps(directory)
  if not saved:
    raise checkpoint.CheckpointError(f'checkpoint {directory}: no checkpoint found there '
                                     f'(--phase={args.phase})')
  meta = checkpoint.read_meta(directory, saved[-1])
  use_w, num_classes = bool(meta['use_w']), int(meta['num_classes'])
  image_shape = tuple(int(s) for s in meta['image_shape'])
  mode = 'student' if use_w else 'guided'
  num_steps = args.steps or meta.get('student_steps') or DEFAULT_STEPS

  mesh = sharding.make_mesh(config.mesh.to_dict())
  if args.batch_size % mesh.size:
    cli_setup.fail(f'--batch_size={args.batch_size}: expected a multiple of the {mesh.size} '
                   f'devices')
  store = model_store.ModelStore(workdir, config, mesh=mesh, image_shape=image_shape,
                                 num_classes=num_classes, strategy=config.sharding)
  abstract = store.abstract_params(use_w=use_w)
  expect = store.expected_meta(use_w=use_w)

  # The sweep's feature network and real-data statistics (same files, same cache).
  with config.unlocked():
    if args.classifier_path:
      e.classifier_path = args.classifier_path
    e.num_samples = max(e.num_samples, args.num_samples)
  train_source = open_source(config.data.name, split=config.data.split,
                             data_dir=config.data.data_dir or None, download=config.data.download)
  net, stats = sweep.feature_net_and_stats(config, os.path.join(workdir, sweep.EVAL_DIR),
                                           train_source)
  floor_split = e.floor_split or config.data.eval_split
  floor = dict(quick_fid.floor_metrics(stats['floor'], stats['reference'],
                                       num_samples=args.num_samples, k=e.precision_recall_k),
               split=floor_split)
  quick = quick_fid.QuickFid(
      feature_net=net, reference=stats['reference'], sample_fn=store.sampler(mode, args.sampler),
      image_shape=image_shape, num_classes=num_classes, num_samples=args.num_samples,
      batch_size=args.batch_size, num_steps=num_steps, w_values=args.w_values, seed=args.seed,
      batch_sharding=sharding.batch_sharding(mesh), mode=mode, k=e.precision_recall_k)
  eval_dir = os.path.join(workdir, sweep.EVAL_DIR)

  prefix = args.output or os.path.join(eval_dir, f'curve_{args.phase}')
  protocol = dict(quick.protocol(), phase=args.phase, directory=directory, sampler=args.sampler,
                  feature_net=net.info,
                  reference_split=e.reference_split, image_shape=list(image_shape),
                  num_classes=num_classes)
  previous = _previous_rows(prefix + '.json', protocol)
  steps = select_steps(saved, args.every)
  times = teacher_file.step_times(directory, steps)
  previous = {s: r for s, r in previous.items() if s in times and r.get('time') == times[s]}
  todo = [s for s in steps if s not in previous]
  log(f'curve: {args.phase}: {len(saved)} saved steps, scoring {len(steps)} '
      f'({len(steps) - len(todo)} already in {prefix}.json); {num_steps} {args.sampler} steps '
      f'({quick.nfe} network evaluations per sample), {args.num_samples} samples at w in '
      f'{list(args.w_values)}: {quick.nfe * args.num_samples * len(args.w_values) * len(todo):,} '
      f'evaluations')
  log(f'curve: floor ({floor_split} split, {floor["num_samples"]} images): FID {floor["fid"]:.3f}')

  rows = []

  def on_row(row):
    rows.append(row)
    if jax.process_index() == 0:
      _write_json(prefix + '.json', {'protocol': protocol, 'floor': floor, 'rows': rows})

  load = lambda step: teacher_file.load_step_params(directory, abstract, step=step,
                                                    expect=expect)[0]
  quick_fid.checkpoint_curve(quick, directory, load, steps=steps,
                             batch_size=teacher_file.phase_batch_size(config, args.phase),
                             previous=previous, on_row=on_row)
  out = {'protocol': protocol, 'floor': floor, 'rows': rows}
  if jax.process_index() == 0:
    _write_json(prefix + '.json', out)
    quick_fid.plot_curve(rows, prefix + '.png', w_values=args.w_values, floor=floor,
                         title=f'{os.path.basename(workdir)} {args.phase}: {args.num_samples} '
                               f'samples, {num_steps} {args.sampler} steps ({net.kind} features)')
    print(quick_fid.table(rows, args.w_values))
    print(f'floor ({floor_split}, {floor["num_samples"]} images): FID {floor["fid"]:.3f}')
    print(f'wrote {prefix}.json and {prefix}.png')
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  with cli_setup.user_errors():
    run(args)
  return 0


if __name__ == '__main__':
  sys.exit(main())
