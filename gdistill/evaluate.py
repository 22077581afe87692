"""Command line: evaluate (or extend the evaluation of) a finished run.

  python -m gdistill.evaluate --workdir=runs/fashion_mnist
  python -m gdistill.evaluate --workdir=DIR --config.eval.num_samples=500 \\
      --config.eval.w_values='(0.0, 1.0)' --config.eval.teacher_steps='(256,)'

Without ``--config`` the run's own DIR/config.json is used (sections it lacks, such
as ``eval`` for runs started before it existed, take the defaults of
gdistill/config_base.py); ``--config=configs/X.py`` takes the eval settings of that
file instead (its training keys must match the run's). Rows already in
DIR/eval/report.json under the same protocol are reused, so adding w values, step
counts or models samples only the new rows.
"""

from gdistill import cli_setup  # sets XLA_FLAGS before JAX starts; pylint: disable=unused-import

import json  # pylint: disable=g-import-not-at-top
import os

from absl import app, flags
from ml_collections import config_flags

from gdistill import cli_setup as _cli
from gdistill import storage
from gdistill.workdir import CONFIG_FILE

_WORKDIR_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'eval',
                               'workdir_config.py')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file; default: the workdir\'s own config.json.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a finished (or partial) run.')
_FROM_WORKDIR = []  # set when the config comes from the workdir's config.json


def _workdir_arg(argv):
  for i, a in enumerate(argv):
    if a.startswith('--workdir='):
      return a.split('=', 1)[1]
    if a == '--workdir' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _with_default_config(argv):
  """Inserts ``--config=<workdir_config.py>:DIR`` when no --config is given."""
  if any(a == '--config' or a.startswith('--config=') for a in argv[1:]):
    return argv
  workdir = _workdir_arg(argv)
  if not workdir:
    _cli.fail('--workdir is required, e.g. --workdir=runs/fashion_mnist')
  if ':' in workdir and not storage.is_remote(workdir):
    _cli.fail(f'--workdir={workdir}: pass --config=... too for a workdir whose path has ":"')
  try:
    storage.check_reachable(workdir)
  except storage.StorageError as e:
    _cli.fail(str(e))
  if not storage.isfile(os.path.join(workdir, CONFIG_FILE)):
    _cli.fail(f'--workdir={workdir}: no {CONFIG_FILE} there; expected the workdir of a '
              f'gdistill run (python -m gdistill.main --config=... --workdir=...)')
  _FROM_WORKDIR.append(workdir)
  return [argv[0], f'--config={_WORKDIR_CONFIG}:{storage.absolute(workdir)}', *argv[1:]]


def _recorded_eval(workdir: str) -> bool:
  return 'eval' in json.loads(storage.read_text(os.path.join(workdir, CONFIG_FILE)))


def parse_flags(argv):
  return _cli.parse_flags(_with_default_config(argv))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  workdir = _WORKDIR.value
  if not workdir:
    _cli.fail('--workdir is required, e.g. --workdir=runs/fashion_mnist')
  from gdistill import console  # pylint: disable=g-import-not-at-top
  console.setup(hold=True)
  if not storage.isdir(os.path.join(workdir, 'checkpoints')):
    _cli.fail(f'--workdir={workdir}: no checkpoints there; train first with '
              f'python -m gdistill.main --config=... --workdir={workdir}')
  config = _cli.config_value(_CONFIG)
  from gdistill import config_validation  # pylint: disable=g-import-not-at-top
  with _cli.user_errors():
    config_validation.validate_eval(config)  # before the data and models load
  if _FROM_WORKDIR and not _recorded_eval(workdir):
    print(f'gdistill: note: {os.path.join(workdir, CONFIG_FILE)} predates the eval section: '
          f'using its defaults (eval.num_samples={config.eval.num_samples}, '
          f'w_values={tuple(config.eval.w_values)}, teacher_steps='
          f'{tuple(config.eval.teacher_steps)}); pass --config=configs/X.py for the eval '
          f'settings of that file', flush=True)
  _cli.maybe_initialize_distributed(config)
  import jax  # pylint: disable=g-import-not-at-top
  from gdistill.eval import sweep  # pylint: disable=g-import-not-at-top
  from gdistill import workdir_lock  # pylint: disable=g-import-not-at-top
  from gdistill.run_setup import open_run  # pylint: disable=g-import-not-at-top
  with _cli.user_errors():
    setup = open_run(config, workdir)
    with workdir_lock.held(setup.workdir, 'gdistill.evaluate'):
      console.open_log(setup.workdir, jax.process_index())
      sweep.run_sweep(config, setup.store, train_source=setup.source)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
