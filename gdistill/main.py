"""Command line: ``python -m gdistill.main --config=configs/X.py --workdir=DIR``.

Overrides: ``--config.teacher.num_steps=100``. Rerunning resumes from the
workdir's checkpoints. Library log lines go to WORKDIR/gdistill.log (``-v 0``: on the
terminal too; ``gdistill.console``).
"""

from gdistill import cli_setup  # sets XLA_FLAGS before JAX starts; pylint: disable=unused-import

import sys  # pylint: disable=g-import-not-at-top

from absl import app, flags
from ml_collections import config_flags

from gdistill import cli_setup as _cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, samples, logs.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from gdistill import console  # pylint: disable=g-import-not-at-top
  console.setup(hold=True)  # the log opens in the workdir once the run may write there
  config = _cli.config_value(_CONFIG)
  if config is None or not _WORKDIR.value:
    _cli.fail('--config and --workdir are required, e.g. '
              '--config=configs/fashion_mnist.py --workdir=runs/fashion_mnist')
  _cli.maybe_initialize_distributed(config)
  from gdistill.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  with _cli.user_errors():
    train_and_evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=_cli.parse_flags)
