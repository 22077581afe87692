"""The driver: validates the config, then chains the stages it lists.

teacher -> stage1 -> stage2 (one phase per halving) -> eval -> translate.
Every training phase runs through ``loop.run_phase``; a phase that already
finished in this workdir is loaded, not retrained, so rerunning the same
command resumes where the last run stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp

from gdistill import (checkpoint, config_validation, encoder, losses, sampling, sharding,
                      xla_options)
from gdistill.data import open_source
from gdistill.grids import save_grid
from gdistill.loop import LoopContext, Phase, run_phase
from gdistill.metric_writer import MetricWriter, log
from gdistill.networks import init_params, make_net, model_kwargs, param_count, student_from_teacher
from gdistill.train_state import init_state, make_optimizer, make_update_fn
from gdistill.workdir import check_config, record_config

STAGE2_PREFIX = 'stage2_n'


def stage2_phase_name(student_steps: int) -> str:
  return f'{STAGE2_PREFIX}{student_steps:04d}'


def halvings(config) -> list[int]:
  """Student step counts of stage 2, e.g. start 64, min 1 -> [32, 16, 8, 4, 2, 1]."""
  out, n = [], config.stage2.start_steps // 2
  while n >= config.stage2.min_steps:
    out.append(n)
    n //= 2
  return out


class Run:
  """One invocation of the pipeline on one workdir."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, os.path.abspath(workdir)
    c = config
    config_validation.validate(c)
    self.mesh = sharding.make_mesh(c.mesh.to_dict())
    config_validation.validate(c, num_devices=self.mesh.size, num_processes=jax.process_count())
    self.source = open_source(c.data.name, split=c.data.split, data_dir=c.data.data_dir or None,
                              download=c.data.download)
    self.image_shape = tuple(self.source.image_shape)
    self.num_classes = self.source.num_classes
    config_validation.validate(c, image_shape=self.image_shape, num_devices=self.mesh.size,
                               num_processes=jax.process_count())
    check_config(c, self.workdir)  # recorded in run(), once the inputs it loads are checked
    self.writer = MetricWriter(self.workdir)
    self.ctx = LoopContext(workdir=self.workdir, mesh=self.mesh, source=self.source, seed=c.seed,
                           strategy=c.sharding, writer=self.writer, log_every=c.log_every,
                           max_to_keep=c.checkpoint.max_to_keep,
                           compile_options=xla_options.compile_options(
                               c, self.mesh.devices.flat[0].platform))
    self.teacher_net = self.net(use_w=False)
    self.student_net = self.net(use_w=True)
    self._samplers = {}
    self._updates = {}

  # ---- networks and metadata -------------------------------------------------

  def net(self, *, use_w: bool, dropout=None):
    return make_net(self.config, num_classes=self.num_classes, out_ch=self.image_shape[-1],
                    use_w=use_w, dropout=dropout)

  def meta(self, phase: str, *, use_w: bool, has_ema: bool, student_steps: Optional[int] = None):
    return {'phase': phase, 'model': model_kwargs(self.config), 'use_w': use_w,
            'mean_type': self.config.diffusion.mean_type, 'num_classes': self.num_classes,
            'image_shape': list(self.image_shape), 'dataset': self.config.data.name,
            'has_ema': has_ema, 'student_steps': student_steps,
            'w_range': [self.config.guidance.w_min, self.config.guidance.w_max]}

  def abstract_params(self, net):
    abstract = jax.eval_shape(functools.partial(init_params, net, image_shape=self.image_shape),
                              jax.random.PRNGKey(0))
    shard = sharding.state_shardings(abstract, self.mesh, self.config.sharding)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shard)

  def optimizer(self, section):
    return make_optimizer(learning_rate=section.learning_rate, warmup_steps=section.warmup_steps,
                          total_steps=section.num_steps, decay=section.lr_decay,
                          grad_clip=section.grad_clip)

  def sample_fn(self, mode: str, sampler: str = 'ddim'):
    key = (mode, sampler)
    if key not in self._samplers:
      net = self.teacher_net if mode != 'student' else self.student_net
      self._samplers[key] = sampling.AotSampler(sampling.make_sample_fn(
          apply_fn=net.apply, mean_type=self.config.diffusion.mean_type,
          num_classes=self.num_classes, mode=mode, sampler=sampler),
          name=f'{mode}/{sampler}', log=log, compile_options=self.ctx.compile_options)
    return self._samplers[key]

  # ---- sample grids --------------------------------------------------------

  def write_grid(self, params, *, mode: str, w: float, num_steps: int, name: str):
    path = os.path.join(self.workdir, 'samples', f'{name}_steps{num_steps}_w{w:g}.png')
    if os.path.exists(path):
      return
    s = self.config.samples
    images = sampling.class_grid(self.sample_fn(mode), params,
                                 num_classes=min(self.num_classes, s.max_classes),
                                 per_class=s.per_class, image_shape=self.image_shape, w=w,
                                 num_steps=num_steps, seed=self.config.seed,
                                 sharding=sharding.batch_sharding(self.mesh))
    if jax.process_index() == 0:
      save_grid(images, path)
      log(f'wrote {path}')

  # ---- phases --------------------------------------------------------------

  def teacher_phase(self) -> Phase:
    c, net = self.config.teacher, self.teacher_net
    opt = self.optimizer(c)
    loss = functools.partial(losses.teacher_loss, apply_fn=net.apply,
                             mean_type=self.config.diffusion.mean_type,
                             num_classes=self.num_classes, p_uncond=c.p_uncond,
                             weighting=self.config.diffusion.weighting)
    seed = self.config.seed

    def init_fn(teacher):
      del teacher
      return init_state(init_params(net, jax.random.PRNGKey(seed), self.image_shape), opt,
                        ema=c.ema_decay > 0)

    def on_done(state):
      s = self.config.samples
      for w in sorted({0.0, s.teacher_w}):
        self.write_grid(state.eval_params, mode='guided', w=w, num_steps=s.teacher_steps,
                        name='teacher')

    return Phase(name='teacher', num_steps=c.num_steps, batch_size=c.batch_size,
                 init_fn=init_fn, update_fn=make_update_fn(loss, opt, ema_decay=c.ema_decay),
                 teacher={}, meta=self.meta('teacher', use_w=False, has_ema=c.ema_decay > 0),
                 checkpoint_every=c.checkpoint_every, on_done=on_done)

  def student_phase(self, name: str, section, *, loss, teacher, from_teacher_net: bool,
                    grid_steps: int, student_steps: Optional[int]) -> Phase:
    """A phase that trains the w-conditioned student, initialised from ``teacher['params']``.

    Phases with the same section and loss share one update function (so the
    halvings of stage 2 share one compiled step).
    """
    train_net = self.net(use_w=True, dropout=section.dropout)
    opt = self.optimizer(section)
    key = (id(section), loss.func)
    if key not in self._updates:
      self._updates[key] = make_update_fn(functools.partial(loss, apply_fn=train_net.apply), opt,
                                          ema_decay=section.ema_decay)
    seed = self.config.seed

    def init_fn(teacher):
      if from_teacher_net:  # stage 1: teacher weights + zero-initialised w branch
        params = student_from_teacher(
            init_params(train_net, jax.random.PRNGKey(seed + 1), self.image_shape),
            teacher['params'])
      else:  # stage 2: an exact copy of the previous student
        params = jax.tree.map(jnp.copy, teacher['params'])
      return init_state(params, opt, ema=section.ema_decay > 0)

    def on_done(state):
      for w in self.config.samples.student_w:
        self.write_grid(state.eval_params, mode='student', w=float(w), num_steps=grid_steps,
                        name=name)

    return Phase(name=name, num_steps=section.num_steps, batch_size=section.batch_size,
                 init_fn=init_fn, update_fn=self._updates[key],
                 teacher=teacher,
                 meta=self.meta(name, use_w=True, has_ema=section.ema_decay > 0,
                                student_steps=student_steps),
                 checkpoint_every=section.checkpoint_every, on_done=on_done)

  def stage1_phase(self, teacher_params) -> Phase:
    c, d = self.config, self.config.diffusion
    loss = functools.partial(losses.stage1_loss, teacher_apply=self.teacher_net.apply,
                             mean_type=d.mean_type, teacher_mean_type=d.mean_type,
                             num_classes=self.num_classes, w_min=c.guidance.w_min,
                             w_max=c.guidance.w_max, weighting=d.weighting)
    return self.student_phase('stage1', c.stage1, loss=loss, teacher={'params': teacher_params},
                              from_teacher_net=True, grid_steps=c.stage2.start_steps,
                              student_steps=None)

  def stage2_phase(self, teacher_params, student_steps: int) -> Phase:
    c, d = self.config, self.config.diffusion
    loss = functools.partial(losses.stage2_loss, mean_type=d.mean_type, w_min=c.guidance.w_min,
                             w_max=c.guidance.w_max, grid=c.stage2.time_grid,
                             weighting=d.weighting)
    n = jax.device_put(jnp.int32(student_steps), sharding.replicated(self.mesh))
    return self.student_phase(stage2_phase_name(student_steps), c.stage2, loss=loss,
                              teacher={'params': teacher_params, 'num_steps': n},
                              from_teacher_net=False, grid_steps=student_steps,
                              student_steps=student_steps)

  # ---- loading finished phases -----------------------------------------------

  def load_final(self, directory: str, net, *, what: str):
    """Sampling params of a finished phase directory; clear errors otherwise."""
    params, meta = checkpoint.load_eval_params(
        directory, self.abstract_params(net),
        expect={'model': model_kwargs(self.config), 'image_shape': list(self.image_shape),
                'num_classes': self.num_classes, 'mean_type': self.config.diffusion.mean_type,
                'use_w': net.use_w})
    log(f'loaded {what} from {directory} ({param_count(params) / 1e6:.2f}M parameters)')
    return params

  def teacher_params(self):
    c = self.config
    if c.teacher_checkpoint:
      path = os.path.abspath(c.teacher_checkpoint)
      if os.path.isdir(os.path.join(path, checkpoint.CHECKPOINT_DIR, 'teacher')):
        path = os.path.join(path, checkpoint.CHECKPOINT_DIR, 'teacher')
      if not os.path.isdir(path):
        raise checkpoint.CheckpointError(
            f'teacher_checkpoint={c.teacher_checkpoint!r}: no such directory (expected a '
            f'workdir or its checkpoints/teacher directory)')
      return self.load_final(path, self.teacher_net, what='teacher')
    if 'teacher' in c.stages:
      log(f'teacher: {param_count(self.abstract_params(self.teacher_net)) / 1e6:.2f}M parameters')
      return run_phase(self.teacher_phase(), self.ctx).eval_params
    return self.load_final(checkpoint.phase_dir(self.workdir, 'teacher'), self.teacher_net,
                           what='teacher')

  def stage1_params(self, teacher_params):
    if 'stage1' in self.config.stages:
      return run_phase(self.stage1_phase(teacher_params), self.ctx).eval_params
    return self.load_final(checkpoint.phase_dir(self.workdir, 'stage1'), self.student_net,
                           what='stage-1 student')

  # ---- encoder distillation (for the translate stage) ---------------------------

  def encoder_phase(self, teacher_params, student_steps: int, *, clean_start: bool) -> Phase:
    """One halving of the DDIM encoder: a student_steps-step encoder from a 2x one.

    ``clean_start``: the teacher is a DDIM encoder (x_hat(z_0) = z_0), true for the
    stage-1 model, false for a distilled encoder.
    """
    c, d = self.config, self.config.diffusion
    loss = functools.partial(encoder.encoder_distill_loss, mean_type=d.mean_type,
                             encode_w=float(c.translate.encode_w),
                             grid=c.translate.encoder.time_grid, weighting=d.weighting)
    repl = sharding.replicated(self.mesh)
    teacher = {'params': teacher_params,
               'num_steps': jax.device_put(jnp.int32(student_steps), repl),
               'clean_start': jax.device_put(jnp.bool_(clean_start), repl)}
    name = encoder.encoder_phase_name(student_steps)
    phase = self.student_phase(name, c.translate.encoder, loss=loss, teacher=teacher,
                               from_teacher_net=False, grid_steps=student_steps,
                               student_steps=student_steps)
    # An encoder has no sample grids; its meta says what it encodes with.
    return dataclasses.replace(phase, on_done=None, meta=phase.meta | {
        'encoder': True, 'encode_w': float(c.translate.encode_w)})

  def distill_encoder(self):
    """Runs (or loads) every encoder halving from the finished stage-1 model."""
    t = self.config.translate
    params = self.load_final(checkpoint.phase_dir(self.workdir, 'stage1'), self.student_net,
                             what='stage-1 student (encoder teacher)')
    for i, n in enumerate(encoder.encoder_halvings(t.encoder_start_steps, t.encoder_min_steps)):
      params = run_phase(self.encoder_phase(params, n, clean_start=i == 0), self.ctx).eval_params

  # ---- the whole run -----------------------------------------------------------

  def run(self):
    stages = tuple(self.config.stages)
    needs_teacher = any(s in stages for s in ('teacher', 'stage1'))
    trains_teacher = 'teacher' in stages and not self.config.teacher_checkpoint
    # Checkpoints this run only loads are loaded (and checked) before anything is written.
    teacher = self.teacher_params() if needs_teacher and not trains_teacher else None
    stage1 = None
    if 'stage2' in stages and 'stage1' not in stages:
      stage1 = self.stage1_params(None)
    record_config(self.config, self.workdir)
    if needs_teacher and trains_teacher:
      teacher = self.teacher_params()
    if 'stage2' in stages:
      params = stage1 if stage1 is not None else self.stage1_params(teacher)
      for n in halvings(self.config):
        params = run_phase(self.stage2_phase(params, n), self.ctx).eval_params
    elif 'stage1' in stages:
      self.stage1_params(teacher)
    if 'eval' in stages:
      from gdistill.eval import sweep  # pylint: disable=g-import-not-at-top
      sweep.run_sweep(self)
    if 'translate' in stages:
      if self.config.translate.distill_encoder:
        self.distill_encoder()
      from gdistill import translate  # pylint: disable=g-import-not-at-top
      translate.run_stage(self.config, self.workdir)
    self.writer.close()
    log(f'done: {self.workdir}')


def train_and_evaluate(config, workdir: str) -> None:
  Run(config, workdir).run()
