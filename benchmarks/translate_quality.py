"""Translation quality of a finished run: does the result look like the target class,
and how close does it stay to the input?

For each (source, target) pair of the run's ``translate.pairs``, the first
``--per_pair`` test images of the source class are translated along each route:
  ddimN       the stage-1 model as DDIM encoder and decoder (N = translate.ddim_steps,
              and N = each distilled step count, for an equal-step comparison);
  distilledN  the distilled encoder (encoder_nN) with the stage-2 student of N steps.
Scores (``gdistill.translation.quality``): target_rate (the evaluation classifier's
argmax is the target), source_rate, pixel_rmse ([0, 1] units) and feature_l2
(classifier penultimate features), plus the same for the untranslated inputs.

The classifier is the eval stage's (WORKDIR/eval/classifier.npz, or
eval.classifier_path); where there is none it is trained with the eval settings
and saved there, so the eval stage reuses it.

  python benchmarks/translate_quality.py --workdir=runs/fashion_mnist [--per_pair=100] \\
      [--w=1.0] [--json=FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from gdistill import cli_setup  # pylint: disable=g-import-not-at-top,unused-import  # before jax


def classifier(config, workdir):
  """The eval stage's classifier, trained and saved where it expects it if absent."""
  from gdistill import translation  # pylint: disable=g-import-not-at-top
  from gdistill.data import open_source  # pylint: disable=g-import-not-at-top
  from gdistill.eval import features  # pylint: disable=g-import-not-at-top
  found = translation.saved_classifier(config, workdir)
  if found is not None:
    return found, translation.classifier_path(config, workdir)
  d, e = config.data, config.eval
  src = lambda split: open_source(d.name, split=split, data_dir=d.data_dir or None,
                                  download=d.download)
  path = translation.classifier_path(config, workdir)
  net = features.classifier_net(path=path, train_source=src(d.split),
                                test_source=src(d.eval_split), steps=e.classifier_steps,
                                batch_size=e.classifier_batch_size, seed=e.seed,
                                retrain_if_stale=False)
  return net.fn, path


def table(report: dict) -> str:
  lines = ['| pair | route | NFE | classified as target | still source | pixel RMSE | '
           'feature L2 |', '|---|---|---:|---:|---:|---:|---:|']
  for p in report['pairs']:
    pair = f'{p["source_name"]} -> {p["target_name"]}'
    q = p['input']
    lines.append(f'| {pair} | (input) | 0 | {q["target_rate"]:.2f} | {q["source_rate"]:.2f} | '
                 f'0 | 0 |')
    for name, r in p['routes'].items():
      lines.append(f'| {pair} | {name} | {r["nfe"]} | {r["target_rate"]:.2f} | '
                   f'{r["source_rate"]:.2f} | {r["pixel_rmse"]:.3f} | {r["feature_l2"]:.2f} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--per_pair', type=int, default=None,
                      help='images per pair (default: translate.quality_per_pair)')
  parser.add_argument('--w', type=float, default=None, help='decoder guidance (translate.w)')
  parser.add_argument('--json', default=None,
                      help='output (default: WORKDIR/translate/quality.json)')
  args = parser.parse_args()

  from gdistill import translation  # pylint: disable=g-import-not-at-top
  from gdistill.data import open_source  # pylint: disable=g-import-not-at-top
  from gdistill.model_store import ModelStore, load_config  # pylint: disable=g-import-not-at-top
  config = load_config(args.workdir)
  if args.per_pair:
    config.translate.quality_per_pair = args.per_pair
  if args.w is not None:
    config.translate.w = args.w
  work = ModelStore.open(args.workdir, config)
  classify, path = classifier(config, work.path)
  t = config.translate
  routes = translation.stage_routes(config, work)
  translator = translation.Translator(work, encode_w=t.encode_w, w=t.w)
  d = config.data
  eval_source = open_source(d.name, split=d.eval_split, data_dir=d.data_dir or None,
                            download=d.download)
  t0 = time.perf_counter()
  report = translation.quality_report(config, work, translator, routes, eval_source, classify)
  report.update(classifier=path, seconds=round(time.perf_counter() - t0, 1),
                per_pair=t.quality_per_pair)
  out = args.json or os.path.join(work.path, translation.TRANSLATE_DIR, translation.QUALITY_FILE)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w') as f:
    json.dump(report, f, indent=2)
  print(table(report))
  print(f'wrote {out} ({report["seconds"]} s)')


if __name__ == '__main__':
  main()
