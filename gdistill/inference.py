"""A workdir's trained models, loaded for the sampling and translation commands.

Everything comes from the workdir: the run's config (``config.json``) and each
phase's checkpoint meta (image shape, classes, whether the network takes w).
Missing or unfinished models are one-line ``CheckpointError``s that list what
the workdir does hold.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np

from gdistill import checkpoint, sharding, xla_options
from gdistill.checkpoint import CheckpointError
from gdistill.encoder import ENCODER_PREFIX, encoder_phase_name
from gdistill.networks import init_params, make_net, model_kwargs
from gdistill.workdir import CONFIG_FILE, WorkdirError

STAGE2_PREFIX = 'stage2_n'  # as gdistill.train names the halvings


def stage2_phase_name(student_steps: int) -> str:
  return f'{STAGE2_PREFIX}{student_steps:04d}'


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was created with, over the defaults of sections added since."""
  from gdistill.eval.workdir_config import get_config  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    raise WorkdirError(f'--workdir={workdir}: no {CONFIG_FILE} there (expected the workdir of a '
                       f'gdistill run, e.g. runs/fashion_mnist)')
  return get_config(workdir)


def class_names(dataset: str, num_classes: int) -> list[str]:
  """Human-readable label names where gdistill knows them, else the numbers."""
  if dataset in ('fashion_mnist', 'fashion_mnist_local'):
    from gdistill.data import fashion_mnist_local  # pylint: disable=g-import-not-at-top
    names = list(fashion_mnist_local.CLASS_NAMES)
    if len(names) == num_classes:
      return names
  return [str(i) for i in range(num_classes)]


@dataclasses.dataclass(frozen=True)
class Model:
  """One loaded phase: ``apply_fn`` and sampling ``params``; ``mode`` for denoise_fn_for."""
  phase: str
  apply_fn: Callable
  params: object
  meta: dict
  mode: str  # 'guided' (the teacher: 2 network evaluations per step) or 'student'


class Workdir:
  """The finished phases of one workdir, and the sampling device mesh."""

  def __init__(self, workdir: str, config: Optional[ml_collections.ConfigDict] = None):
    self.path = os.path.abspath(workdir)
    if not os.path.isdir(self.path):
      raise WorkdirError(f'--workdir={workdir}: no such directory')
    self.config = config if config is not None else load_config(self.path)
    root = os.path.join(self.path, checkpoint.CHECKPOINT_DIR)
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    self.steps = {}  # phase name -> latest saved step
    for name in names:
      step = checkpoint.latest_complete(os.path.join(root, name))
      if step is not None:
        self.steps[name] = step
    if not self.steps:
      raise CheckpointError(f'workdir {self.path}: no checkpoints (train first: python -m '
                            f'gdistill.main --config=... --workdir={workdir})')
    self.mesh = sharding.make_mesh({sharding.DATA_AXIS: -1})
    self.compile_options = xla_options.compile_options(self.config,
                                                       self.mesh.devices.flat[0].platform)
    meta = self.meta(next(iter(self.steps)))
    self.image_shape = tuple(meta['image_shape'])
    self.num_classes = int(meta['num_classes'])
    self.dataset = meta.get('dataset', self.config.data.name)

  def meta(self, phase: str) -> dict:
    return checkpoint.read_meta(checkpoint.phase_dir(self.path, phase), self.steps[phase])

  def _counts(self, prefix: str) -> list[int]:
    return sorted(int(n[len(prefix):]) for n in self.steps if n.startswith(prefix))

  def student_steps(self) -> list[int]:
    """Step counts of the distilled (stage-2) students held here."""
    return self._counts(STAGE2_PREFIX)

  def encoder_steps(self) -> list[int]:
    """Step counts of the distilled encoders held here."""
    return self._counts(ENCODER_PREFIX)

  def describe(self) -> str:
    """What the workdir holds, for error messages."""
    parts = [p for p in ('teacher', 'stage1') if p in self.steps]
    students, encoders = self.student_steps(), self.encoder_steps()
    if students:
      parts.append(f'students for {", ".join(map(str, students))} steps')
    if encoders:
      parts.append(f'encoders for {", ".join(map(str, encoders))} steps')
    return '; '.join(parts) or 'nothing usable'

  @functools.cached_property
  def class_names(self) -> list[str]:
    return class_names(self.dataset, self.num_classes)

  def parse_class(self, value: str, flag: str) -> int:
    """A class given by label number or (case-insensitive) name; ValueError otherwise."""
    names = self.class_names
    text = str(value).strip()
    if text.lstrip('-').isdigit():
      label = int(text)
      if 0 <= label < self.num_classes:
        return label
    else:
      wanted = [i for i, n in enumerate(names) if n.lower() == text.lower()
                or n.lower().split('/')[0] == text.lower()]
      if len(wanted) == 1:
        return wanted[0]
    listing = ', '.join(f'{i} {n}' if n != str(i) else n for i, n in enumerate(names))
    raise ValueError(f'{flag}={value}: expected a class of {self.dataset} in '
                     f'0..{self.num_classes - 1} ({listing})')

  def load(self, phase: str) -> Model:
    """Sampling parameters of a phase, with its apply function."""
    if phase not in self.steps:
      raise CheckpointError(f'workdir {self.path} has no {phase} checkpoint (it holds: '
                            f'{self.describe()})')
    meta = self.meta(phase)
    net = make_net(self.config, num_classes=self.num_classes, out_ch=self.image_shape[-1],
                   use_w=bool(meta['use_w']))
    abstract = jax.eval_shape(functools.partial(init_params, net, image_shape=self.image_shape),
                              jax.random.PRNGKey(0))
    repl = sharding.replicated(self.mesh)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                            abstract)
    params, meta = checkpoint.load_eval_params(
        checkpoint.phase_dir(self.path, phase), abstract,
        expect={'model': model_kwargs(self.config), 'image_shape': list(self.image_shape),
                'use_w': net.use_w})
    return Model(phase=phase, apply_fn=net.apply, params=params, meta=meta,
                 mode='student' if net.use_w else 'guided')


def require_student(work: Workdir, steps: int, *, flag: str = '--steps') -> str:
  """The stage-2 phase of an N-step student; CheckpointError listing the others."""
  if steps not in work.student_steps():
    raise CheckpointError(
        f'{flag}={steps}: workdir {work.path} has no {steps}-step student (it holds: '
        f'{work.describe()})')
  return stage2_phase_name(steps)


def encoder_phase(work: Workdir, steps: int) -> Optional[str]:
  """The distilled-encoder phase of N steps, or None."""
  return encoder_phase_name(steps) if steps in work.encoder_steps() else None


def to_host(x) -> np.ndarray:
  """A (possibly multi-process) array as numpy on every process."""
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run_batched(fn: Callable, arrays: Sequence[np.ndarray], *, batch_size: int,
                mesh) -> np.ndarray:
  """``fn(chunk_index, *chunks)`` over the leading axis; results concatenated.

  Every chunk is padded to one size (a multiple of the mesh's devices), so a
  jitted ``fn`` compiles once; chunks are split over the data axis.
  """
  n = int(arrays[0].shape[0])
  devices = mesh.size
  size = max(devices, -(-min(batch_size, n) // devices) * devices)
  batch_sh = sharding.batch_sharding(mesh)
  out = []
  for k, start in enumerate(range(0, n, size)):
    chunk = [np.asarray(a[start:start + size]) for a in arrays]
    m = chunk[0].shape[0]
    if m < size:  # pad with copies of the last row; cut off below
      chunk = [np.concatenate([c, np.repeat(c[-1:], size - m, axis=0)]) for c in chunk]
    # The same host values on every process: device_put assembles the global array.
    chunk = [jax.device_put(c, batch_sh) for c in chunk]
    out.append(to_host(fn(k, *chunk))[:m])
  return np.concatenate(out)
