"""The model store of a workdir: "the sampling parameters and network of phase X".

One place loads a finished phase's model, with the checks of its checkpoint meta
(architecture, image shape, classes, parameterisation, whether it takes w), for the
driver, the evaluation sweep, the sample and translate commands and the notebook.
Which phases exist, and what each is, comes from ``gdistill.run_plan``.

The driver builds a store over its own mesh and sharding strategy
(``ModelStore(...)``); the commands open one over a finished workdir
(``ModelStore.open(workdir)``), which reads the run's ``config.json`` and the image
shape and classes from the checkpoints' meta. Missing or unfinished models are
one-line ``CheckpointError``s that say what the workdir does hold.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import jax
import ml_collections

from gdistill import (checkpoint, compiled_samplers, denoiser, methods, noise_paths, run_plan,
                      sharding, storage, teacher_file, teacher_source, xla_options)
from gdistill.checkpoint import CheckpointError
from gdistill.metric_writer import log
from gdistill.networks import (init_params, make_net, model_kwargs, param_count,
                               student_from_teacher)
from gdistill.workdir import CONFIG_FILE, WorkdirError


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was created with, over the defaults of sections added since."""
  from gdistill.eval.workdir_config import get_config  # pylint: disable=g-import-not-at-top
  storage.check_reachable(workdir)
  if not storage.isfile(os.path.join(workdir, CONFIG_FILE)):
    raise WorkdirError(f'--workdir={workdir}: no {CONFIG_FILE} there (expected the workdir of a '
                       f'gdistill run, e.g. runs/fashion_mnist)')
  return get_config(workdir)


# Where a relative path that does not exist from the working directory is looked up next:
# the directory holding the gdistill package (the checkout, or site-packages), so that
# ``gdistill/weights/...`` names the weights shipped with the package from anywhere.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_path(path: str) -> str:
  """``path`` made absolute: from the working directory if it exists there, else from
  PACKAGE_PARENT if it exists there, else from the working directory (a URL as it is)."""
  if storage.is_remote(path):
    return path
  here = os.path.abspath(path)
  shipped = os.path.join(PACKAGE_PARENT, path)
  return shipped if not os.path.exists(here) and os.path.exists(shipped) else here


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
  """One loaded phase: its ``net`` (a ``gdistill.denoiser.Denoiser``) and sampling
  ``params``.

  ``mode``: ``guided`` (the teacher, 2 network evaluations per step) or ``student``
  (a w-conditioned network, 1 per step).
  """
  phase: str
  net: denoiser.Denoiser
  params: object
  meta: dict
  mode: str


class ModelStore:
  """The trained phases of one workdir, the networks that run them and their samplers."""

  def __init__(self, workdir: str, config, *, mesh, image_shape, num_classes: int,
               dataset: Optional[str] = None, strategy: str = 'replicated',
               compile_options: Optional[dict] = None, codec=None, foreign=None):
    """``image_shape``: of the networks' inputs (a latent run's: the latents');
    ``codec``: between images and that space (default: the config's, ``codec_for``)."""
    self.path = storage.absolute(workdir)
    self.config = config
    self.mesh = mesh
    self.image_shape = tuple(int(s) for s in image_shape)
    self.num_classes = int(num_classes)
    self.dataset = dataset or config.data.name
    self.strategy = strategy
    self.compile_options = (compile_options if compile_options is not None else
                            xla_options.compile_options(config, mesh.devices.flat[0].platform))
    self.plan = run_plan.from_config(config)
    self._samplers = {}
    self._codec = codec
    if foreign is not None:  # the teacher.source factory's teacher, already called
      self.__dict__['foreign'] = foreign

  @classmethod
  def open(cls, workdir: str, config=None) -> 'ModelStore':
    """The store of a finished (or partly finished) workdir, sampling on every device."""
    storage.check_reachable(workdir)
    path = storage.absolute(workdir)
    if not storage.isdir(path):
      raise WorkdirError(f'--workdir={workdir}: no such directory')
    config = config if config is not None else load_config(path)
    mesh = sharding.make_mesh({sharding.DATA_AXIS: -1})
    # Image shape and classes: from the meta of any finished phase.
    probe = cls(path, config, mesh=mesh, image_shape=(1, 1, 1), num_classes=1)
    found = probe.finished()
    if not found:
      raise CheckpointError(f'workdir {path}: no checkpoints (train first: python -m '
                            f'gdistill.main --config=... --workdir={workdir})')
    meta = probe.meta(next(iter(found)))
    return cls(path, config, mesh=mesh, image_shape=meta['image_shape'],
               num_classes=meta['num_classes'], dataset=meta.get('dataset'),
               compile_options=probe.compile_options)

  @classmethod
  def open_file(cls, path: str) -> tuple['ModelStore', 'Model']:
    """A one-file model (``gdistill.teacher_file``: weights + JSON sidecar, e.g. the
    shipped teacher) and a store over it that samples on every device."""
    from gdistill.eval.workdir_config import config_from_dict  # pylint: disable=g-import-not-at-top
    path = resolve_path(path)
    info = teacher_file.read_info(path)
    config = config_from_dict(info.get('config') or {})
    config.teacher_checkpoint = path
    store = cls(os.path.dirname(path), config, mesh=sharding.make_mesh({sharding.DATA_AXIS: -1}),
                image_shape=info['image_shape'], num_classes=info['num_classes'],
                dataset=info.get('dataset'))
    use_w = bool(info.get('use_w'))
    params, meta = teacher_file.load_params(path, expect=store.expected_meta(use_w=use_w),
                                            abstract_params=store.abstract_params(use_w=use_w))
    log(f'loaded {info.get("phase", "the model")} from {path} '
        f'({param_count(params) / 1e6:.2f}M parameters)')
    return store, Model(phase=info.get('phase') or os.path.basename(path),
                        net=store.denoiser(use_w=use_w), params=params, meta=meta,
                        mode=_mode(info.get('phase'), use_w))

  # ---- which phases exist --------------------------------------------------------

  def directory(self, phase: str) -> str:
    """Where a phase's model is: its checkpoint directory; the teacher's is
    ``config.teacher_checkpoint`` where one is given (a workdir, its checkpoints/teacher
    directory, or a one-file teacher ``*.msgpack`` of ``gdistill.teacher_file``)."""
    external = self.config.get('teacher_checkpoint', '')
    if phase == run_plan.TEACHER and external:
      path = resolve_path(external)
      nested = checkpoint.phase_dir(path, run_plan.TEACHER)
      return nested if storage.isdir(nested) else path
    return checkpoint.phase_dir(self.path, phase)

  def _file(self, phase: str) -> Optional[str]:
    """The one-file weights that hold a phase (the teacher's, from teacher_checkpoint)."""
    path = self.directory(phase)
    return path if path.endswith(teacher_file.SUFFIX) or storage.isfile(path) else None

  def step(self, phase: str) -> Optional[int]:
    """The latest saved step of a phase, or None (a ``teacher.source`` teacher: 0)."""
    if phase == run_plan.TEACHER and self.source:
      return 0
    path = self._file(phase)
    if path is not None:
      return int(teacher_file.read_info(path).get('step') or 0) if storage.isfile(path) else None
    return checkpoint.latest_complete(self.directory(phase))

  def finished(self) -> dict[str, int]:
    """Phase name -> latest saved step, for every phase with a checkpoint, in plan order."""
    root = os.path.join(self.path, checkpoint.CHECKPOINT_DIR)
    listed = storage.listdir(root)
    names = self.plan.names + [n for n in run_plan.from_names(listed).names
                               if n not in self.plan]
    steps = {n: self.step(n) for n in names}
    return {n: s for n, s in steps.items() if s is not None}

  @property
  def found(self) -> run_plan.RunPlan:
    """The plan of the phases this workdir holds."""
    return run_plan.from_names(self.finished(), run_plan.fine_grid(self.config))

  def student_steps(self) -> list[int]:
    """Step counts of the distilled (stage-2) students held here, smallest first."""
    return sorted(self.found.student_steps)

  def encoder_steps(self) -> list[int]:
    """Step counts of the distilled encoders held here, smallest first."""
    return sorted(self.found.encoder_steps)

  def describe(self) -> str:
    """What the workdir holds, for error messages."""
    have = self.finished()
    parts = [p for p in (run_plan.TEACHER, run_plan.STAGE1) if p in have]
    for what, counts in (('students', self.student_steps()), ('encoders', self.encoder_steps())):
      if counts:
        parts.append(f'{what} for {", ".join(map(str, counts))} steps')
    return '; '.join(parts) or 'nothing usable'

  def meta(self, phase: str) -> dict:
    """A phase's checkpoint meta (a one-file teacher's sidecar)."""
    if phase == run_plan.TEACHER and self.source:
      f = self.foreign
      return {'phase': phase, 'model': f.meta(self.source), 'use_w': False,
              'mean_type': f.net.output, 'image_shape': list(f.image_shape),
              'num_classes': int(f.num_classes), 'step': 0}
    path = self._file(phase)
    if path is not None:
      return teacher_file.read_info(path)
    return checkpoint.read_meta(self.directory(phase))

  def student_phase(self, sampler: str, steps: int) -> Optional[str]:
    """The distilled student held here that serves ``sampler`` at ``steps``, or None."""
    spec = self.found.student_for(sampler, steps)
    return spec.name if spec is not None else None

  def stochastic_steps(self) -> list[int]:
    """Step counts at which a distilled student held here serves the stochastic sampler."""
    return sorted(self.found.stochastic_steps())

  def encoder_phase(self, steps: int) -> Optional[str]:
    """The distilled encoder of ``steps`` steps held here, or None."""
    spec = self.found.encoder_for(steps)
    return spec.name if spec is not None else None

  # ---- classes -------------------------------------------------------------------

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

  # ---- the codec: images <-> the networks' space --------------------------------------

  @property
  def codec(self):
    """``gdistill.codec``: IDENTITY (pixels), the config's ``codec.path`` autoencoder, or a
    ``teacher.source`` factory's own codec."""
    if self._codec is None:
      self._codec = codec_for(self.config, self.foreign)
    return self._codec

  @property
  def data_shape(self) -> tuple:
    """[H, W, C] of the images (the networks' shape unless a codec maps them)."""
    c = self.codec
    return self.image_shape if c.is_identity else tuple(int(d) for d in c.image_shape)

  def codec_meta(self) -> dict:
    """The checkpoint meta's ``codec`` entry: none for pixels (earlier metas stay equal)."""
    return {} if self.codec.is_identity else {'codec': self.codec.describe()}

  # ---- networks, parameters and samplers -------------------------------------------

  @property
  def source(self) -> str:
    """``teacher.source`` where it names a factory (``python:...``), else ''."""
    source = self.config.teacher.get('source', '')
    return source if teacher_source.is_python_source(source) else ''

  @functools.cached_property
  def foreign(self) -> Optional[teacher_source.ForeignTeacher]:
    """The teacher of ``teacher.source`` (its factory called once), or None."""
    if not self.source:
      return None
    return teacher_source.load(self.source, self.config)

  def check_foreign(self) -> None:
    """A ``teacher.source`` teacher fits this run's data (ValueError otherwise)."""
    f = self.foreign
    if f is None:
      return
    if tuple(f.image_shape) != self.image_shape or int(f.num_classes) != self.num_classes:
      raise teacher_source.TeacherSourceError(
          f'teacher.source={self.source!r}: the teacher takes images of shape '
                       f'{tuple(f.image_shape)} with {f.num_classes} classes, the data are '
                       f'{self.image_shape} with {self.num_classes}')
    # A discrete teacher's table must hold every grid the halvings query.
    starts = [('stage2.start_steps', int(self.config.stage2.start_steps))]
    if 'translate' in self.config.stages:  # the encoder halvings start from stage 1 there
      starts.append(('translate.encoder_start_steps',
                     int(self.config.translate.encoder_start_steps)))
    for key, steps in starts:
      try:
        noise_paths.check_nested(f.net.path, steps, key=key)
      except ValueError as e:
        raise teacher_source.TeacherSourceError(f'teacher.source={self.source!r}: {e}') from e

  def net(self, *, use_w: bool, dropout=None):
    """gdistill's network of this run (``config.model``: a U-Net or a DiT): the teacher's
    (``use_w=False``) or a student's."""
    if self.source:
      raise teacher_source.TeacherSourceError(
          f'teacher.source={self.source!r}: its networks are the factory\'s')
    return make_net(self.config, num_classes=self.num_classes, out_ch=self.image_shape[-1],
                    use_w=use_w, dropout=dropout)

  def denoiser(self, *, use_w: bool, dropout=None) -> denoiser.Denoiser:
    """The network with its conventions: what the losses, samplers and translation call
    (a ``teacher.source`` teacher's own; its student: the teacher with a w input)."""
    if self.source:
      net = self.foreign.student_net() if use_w else self.foreign.net
    else:
      net = denoiser.for_gdistill_net(self.net(use_w=use_w, dropout=dropout),
                                      mean_type=self.config.diffusion.mean_type,
                                      num_classes=self.num_classes)
    clip = self.config.guidance.get('teacher_clip', 'guided')
    if clip != net.guided_clip:
      net = dataclasses.replace(net, guided_clip=clip)
    if not self.codec.is_identity and net.clip_x != self.codec.clip_x:  # no clipping of latents
      net = dataclasses.replace(net, clip_x=self.codec.clip_x)
    return net

  def init_student(self, rng, teacher_params):
    """Stage 1's first student: every teacher weight, plus a w input that adds nothing
    yet (its last layer zero-initialised), so it computes the conditional teacher."""
    if self.source:
      return self.foreign.init_student(rng, teacher_params)
    return student_from_teacher(init_params(self.net(use_w=True), rng, self.image_shape),
                                teacher_params)

  def abstract_params(self, *, use_w: bool):
    """Parameter shapes of the network, with the shardings of the store's strategy."""
    if self.source:
      teacher = jax.eval_shape(lambda: self.foreign.params)
      abstract = (jax.eval_shape(self.init_student, jax.random.PRNGKey(0), teacher) if use_w
                  else teacher)
    else:
      abstract = jax.eval_shape(
          functools.partial(init_params, self.net(use_w=use_w), image_shape=self.image_shape),
          jax.random.PRNGKey(0))
    shard = sharding.state_shardings(abstract, self.mesh, self.strategy)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shard)

  def model_meta(self, *, use_w: bool) -> dict:
    """The checkpoint meta's ``model`` entry: what the network is."""
    if self.source:
      return self.foreign.meta(self.source)
    return model_kwargs(self.config, use_w=use_w)

  @property
  def mean_type(self) -> str:
    """The networks' output type."""
    return self.foreign.net.output if self.source else self.config.diffusion.mean_type

  def expected_meta(self, *, use_w: bool) -> dict:
    """The checkpoint meta entries a model of this run must have."""
    return {'model': self.model_meta(use_w=use_w), 'image_shape': list(self.image_shape),
            'num_classes': self.num_classes, 'mean_type': self.mean_type, 'use_w': use_w,
            **self.codec_meta()}

  def load(self, phase: str, *, purpose: str = '') -> Model:
    """The sampling parameters (EMA if kept) of a finished phase, with its network.
    ``purpose`` (e.g. 'eval') starts the console line, so that a run loading one model for
    two jobs does not print the same line twice."""
    parsed = run_plan.parse_phase_name(phase)
    if parsed is None:
      raise CheckpointError(f'{phase!r} is not a phase name (expected teacher, stage1, '
                            f'stage2_nNNNN, consistency or encoder_nNNNN)')
    use_w = parsed[0] != run_plan.TEACHER
    if phase == run_plan.TEACHER and self.source:
      self.check_foreign()
      shardings = jax.tree.map(lambda a: a.sharding, self.abstract_params(use_w=False))
      params = jax.device_put(self.foreign.params, shardings)
      log(f'loaded the teacher of {self.source} ({param_count(params) / 1e6:.2f}M parameters)')
      return Model(phase=phase, net=self.foreign.net, params=params, meta=self.meta(phase),
                   mode='guided')
    directory = self.directory(phase)
    if self._file(phase) is not None:
      if not storage.isfile(directory):
        raise CheckpointError(f'teacher_checkpoint={self.config.teacher_checkpoint!r}: no such '
                              f'file ({directory}; expected a teacher weights file, a workdir '
                              f'or its checkpoints/teacher directory)')
      params, meta = teacher_file.load_params(directory, expect=self.expected_meta(use_w=use_w),
                                              abstract_params=self.abstract_params(use_w=use_w))
    elif checkpoint.latest_complete(directory) is None:
      if phase == run_plan.TEACHER and self.config.get('teacher_checkpoint', ''):
        raise CheckpointError(
            f'teacher_checkpoint={self.config.teacher_checkpoint!r}: no teacher checkpoint there '
            f'(expected a workdir or its checkpoints/teacher directory)')
      raise CheckpointError(f'checkpoint {directory}: no checkpoint found there (workdir '
                            f'{self.path} holds: {self.describe()})')
    else:
      params, meta = checkpoint.load_eval_params(directory, self.abstract_params(use_w=use_w),
                                                 expect=self.expected_meta(use_w=use_w))
    log(f'{purpose + ": " if purpose else ""}loaded {phase} from {directory} '
        f'({param_count(params) / 1e6:.2f}M parameters)')
    return Model(phase=phase, net=self.denoiser(use_w=use_w), params=params, meta=meta,
                 mode=_mode(phase, use_w))

  def sampler(self, mode: str, sampler: str = ''):
    """The compiled sampler of ``mode`` (``guided``/``student``/``consistency``) and kind
    ('': ``consistency`` for that mode, else ``ddim``), made once:
    ``fn(params, label, w, z_1, num_steps, rng) -> images`` (a latent run's decoded)."""
    sampler = sampler or ('consistency' if mode == 'consistency' else 'ddim')
    key = (mode, sampler)
    if key not in self._samplers:
      codec = self.codec
      fn = compiled_samplers.AotSampler(compiled_samplers.make_sample_fn(
          self.denoiser(use_w=mode != 'guided'), mode=mode, sampler=sampler,
          codec=None if codec.is_identity else codec),
          name=f'{mode}/{sampler}', log=log, compile_options=self.compile_options)
      if not codec.is_identity:
        fn = compiled_samplers.WithCodec(fn, self.codec_params())
      self._samplers[key] = fn
    return self._samplers[key]

  def codec_params(self):
    """The codec's parameters, replicated over the mesh (None for pixels)."""
    if self.codec.is_identity:
      return None
    if not hasattr(self, '_codec_params'):
      self._codec_params = jax.device_put(self.codec.params, sharding.replicated(self.mesh))
    return self._codec_params


def _mode(phase, use_w: bool) -> str:
  """How a phase's model samples (``methods``): its kind's mode, else by its w input."""
  parsed = run_plan.parse_phase_name(phase or '')
  if parsed is not None and methods.method(parsed[0]).mode:
    return methods.method(parsed[0]).mode
  return 'student' if use_w else 'guided'


def codec_for(config, foreign=None):
  """The codec of a run: a ``teacher.source`` factory's own, else ``codec.path`` (an
  autoencoder file written by ``python -m gdistill.autoencoder``), else pixels."""
  from gdistill import codec as codec_lib  # pylint: disable=g-import-not-at-top
  if foreign is not None and getattr(foreign, 'codec', None) is not None:
    return foreign.codec
  path = (config.get('codec') or {}).get('path', '')
  return codec_lib.from_path(resolve_path(path)) if path else codec_lib.IDENTITY
