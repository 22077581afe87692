"""Training steps of a DiT on the config's data: teacher and stage-1 step time and their
fraction of the matmul peak, as train_steps.py measures the config's own network.

The setup's config with its model section replaced by a DiT of ``--dit-size``
(gdistill/models/dit.py SIZES; default ``tiny`` with --quick, ``fmnist`` otherwise):
the same images, batch, precision, sharding and compile options. Records are
train_steps.py's with a ``dit_`` prefix (``dit_teacher_step_peak_fraction``,
``dit_stage1_step_peak_fraction``, ``dit_stage1_step_over_teacher_step``, ...). A config
whose network is already a DiT is measured by train_steps.py itself; this section then
does nothing.

  python benchmarks/dit_steps.py [--quick] [--dit-size fmnist] [--config configs/X.py]
"""

from __future__ import annotations

import common  # pylint: disable=g-bad-import-order  # sets up sys.path and XLA_FLAGS first

import train_steps  # pylint: disable=g-import-not-at-top

from gdistill import config_base  # pylint: disable=g-import-not-at-top
from gdistill.models import dit, registry  # pylint: disable=g-import-not-at-top

STEPS = ('teacher', 'stage1')
PREFIX = 'dit_'


def default_size(setup: common.Setup) -> str:
  return 'tiny' if setup.quick else 'fmnist'


def dit_setup(setup: common.Setup, size: str) -> common.Setup:
  """``setup`` with a DiT of ``size`` (its SIZES entry written out) for the network."""
  model = config_base.dit_model(size=size, **dit.SIZES[size],
                                remat=bool(setup.config.model.get('remat', False)))
  return common.with_model(setup, model, name_suffix=f' with DiT {size}')


def run(setup: common.Setup, records: common.Records, *, size=None) -> dict:
  if registry.arch_name(setup.config.model) == 'dit':
    print('dit: the config\'s network is a DiT, measured in the train section', flush=True)
    return {}
  inner = common.Records()
  result = train_steps.run(dit_setup(setup, size or default_size(setup)), inner, which=STEPS)
  for r in inner.items:
    records.add(PREFIX + r['name'], r['value'], r['unit'])
  return result


def main():
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument('--dit-size', default=None, choices=sorted(dit.SIZES),
                 help='the DiT (default: tiny with --quick, fmnist otherwise)')
  args = p.parse_args()
  records = common.Records()
  run(common.make_setup(args), records, size=args.dit_size)
  if args.json:
    records.write(args.json)


if __name__ == '__main__':
  main()
