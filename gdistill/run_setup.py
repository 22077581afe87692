"""What every command that works on a run from its config needs first.

``open_run(config, workdir)``: the config checked up front (every key, then batch
sizes against the mesh, then the U-Net against the data's image shape), the device
mesh, the training data source, the check that the workdir holds no run of another
config, and the run's model store. Used by the driver and by ``gdistill.evaluate``.
"""

from __future__ import annotations

import dataclasses

import jax

from gdistill import codec as codec_lib
from gdistill import (config_validation, console, sharding, storage, teacher_source,
                      xla_options)
from gdistill.checkpoint import CheckpointError
from gdistill.data import open_source
from gdistill.model_store import ModelStore, resolve_path
from gdistill.workdir import check_config


@dataclasses.dataclass
class RunSetup:
  workdir: str
  mesh: jax.sharding.Mesh
  source: object  # the training split's ImageSource
  compile_options: dict
  store: ModelStore


def open_codec(config, image_shape, foreign=None):
  """The run's codec (``config.codec.path``, or a ``teacher.source`` teacher's own; pixels
  if neither), checked against the data's ``image_shape``."""
  path = config.codec.get('path', '') if config.get('codec') is not None else ''
  if foreign is not None:
    if path:
      raise config_validation.ConfigError(
          f'codec.path={path!r}: a teacher.source teacher declares its own codec (its '
          f'factory\'s ForeignTeacher.codec); expected codec.path=\'\'')
    codec = foreign.codec or codec_lib.IDENTITY
    if not codec.is_identity and tuple(codec.image_shape) != tuple(image_shape):
      raise config_validation.ConfigError(
          f'teacher.source={config.teacher.source!r}: its codec takes images of shape '
          f'{list(codec.image_shape)}, the data ({config.data.name}) are {list(image_shape)}')
    return codec
  if not path:
    return codec_lib.IDENTITY
  resolved = resolve_path(path)
  if not storage.isfile(resolved):
    raise config_validation.ConfigError(
        f'codec.path={path!r}: no such file ({resolved}); expected an autoencoder file written '
        f'by python -m gdistill.autoencoder, or \'\' for pixels')
  try:
    codec = codec_lib.load(resolved)
  except CheckpointError as e:
    raise config_validation.ConfigError(f'codec.path={path!r}: {e}') from e
  if tuple(codec.image_shape) != tuple(image_shape):
    raise config_validation.ConfigError(
        f'codec.path={path!r}: the autoencoder takes images of shape {list(codec.image_shape)}, '
        f'the data ({config.data.name}) are {list(image_shape)}')
  return codec


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
  teacher = config.teacher.get('source', '')
  foreign = (teacher_source.load(teacher, config) if teacher_source.is_python_source(teacher)
             else None)
  codec = open_codec(config, source.image_shape, foreign)
  model_shape = codec.model_shape(tuple(source.image_shape))
  config_validation.validate(config, image_shape=model_shape,
                             num_devices=mesh.size, num_processes=jax.process_count())
  check_config(config, workdir)
  options = xla_options.compile_options(config, mesh.devices.flat[0].platform)
  store = ModelStore(workdir, config, mesh=mesh, image_shape=model_shape,
                     num_classes=source.num_classes, strategy=config.sharding,
                     compile_options=options, codec=codec, foreign=foreign)
  return RunSetup(workdir=workdir, mesh=mesh, source=source, compile_options=options,
                  store=store)
