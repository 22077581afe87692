"""What every command that works on a run from its config needs first.

``open_run(config, workdir)``: the config checked up front (every key, then batch
sizes against the mesh, then the U-Net against the data's image shape), the device
mesh, the training data source, the check that the workdir holds no run of another
config, and the run's model store. Used by the driver and by ``gdistill.evaluate``.
"""

from __future__ import annotations

import dataclasses

import jax

from gdistill import config_validation, console, sharding, storage, xla_options
from gdistill.data import open_source
from gdistill.model_store import ModelStore
from gdistill.workdir import check_config


@dataclasses.dataclass
class RunSetup:
  workdir: str
  mesh: jax.sharding.Mesh
  source: object  # the training split's ImageSource
  compile_options: dict
  store: ModelStore


def open_run(config, workdir: str) -> RunSetup:
  """Raises ConfigError, DataError or WorkdirError (one line each) before anything is
  written."""
  workdir = storage.absolute(workdir)
  config_validation.validate(config)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  config_validation.validate(config, num_devices=mesh.size, num_processes=jax.process_count())
  with console.output_to_log('tfds'):  # preparing a dataset prints messages and progress bars
    source = open_source(config.data.name, split=config.data.split,
                         data_dir=config.data.data_dir or None, download=config.data.download)
  config_validation.validate(config, image_shape=tuple(source.image_shape),
                             num_devices=mesh.size, num_processes=jax.process_count())
  check_config(config, workdir)
  options = xla_options.compile_options(config, mesh.devices.flat[0].platform)
  store = ModelStore(workdir, config, mesh=mesh, image_shape=source.image_shape,
                     num_classes=source.num_classes, strategy=config.sharding,
                     compile_options=options)
  return RunSetup(workdir=workdir, mesh=mesh, source=source, compile_options=options,
                  store=store)
