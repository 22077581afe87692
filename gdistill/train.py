"""The driver: validates the config, then walks the run plan's phases.

teacher -> stage1 -> stage2 (one phase per halving) -> consistency -> eval -> encoder
halvings -> translate. Every training phase runs through ``loop.run_phase``; a phase that
already finished in this workdir is loaded, not retrained, so rerunning the same
command resumes where the last run stopped. What the phases are comes from
``gdistill.run_plan``, how each trains from ``gdistill.phases`` and finished models
from ``gdistill.model_store``.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import jax

from gdistill import compiled_samplers, console, run_plan, sharding, storage, workdir_lock
from gdistill.data import latents, num_workers
from gdistill.grids import save_grid
from gdistill.loop import LoopContext, run_phase
from gdistill.metric_writer import MetricWriter, RunProgress, log
from gdistill.networks import param_count
from gdistill.phases import PhaseBuilder
from gdistill.run_setup import open_run
from gdistill.workdir import record_config


class Run:
  """One invocation of the pipeline on one workdir."""

  def __init__(self, config, workdir: str):
    self.config = config
    setup = open_run(config, workdir)  # recorded in run(), once the inputs it loads are checked
    self.workdir, self.mesh, self.source, self.store = (setup.workdir, setup.mesh, setup.source,
                                                        setup.store)
    self.plan = self.store.plan
    # One writer per workdir: refused here, before anything is written, if another runs.
    self._lock = (workdir_lock.acquire(self.workdir, 'gdistill.main')
                  if jax.process_index() == 0 else None)
    self.writer = MetricWriter(self.workdir)
    self.ctx = LoopContext(workdir=self.workdir, mesh=self.mesh, source=self.source,
                           seed=config.seed, strategy=config.sharding, writer=self.writer,
                           log_every=config.log_every, max_to_keep=config.checkpoint.max_to_keep,
                           keep_train_state=config.checkpoint.keep_train_state,
                           data_workers=num_workers(config.data.num_workers),
                           compile_options=setup.compile_options)
    self.builder = PhaseBuilder(config, self.store)
    self._features = None  # (feature net, real-data statistics) of in-training tracking

  # ---- sample grids --------------------------------------------------------

  def write_grid(self, params, *, mode: str, w: float, num_steps: int, name: str,
                 sampler: str = 'ddim'):
    path = os.path.join(self.workdir, 'samples', f'{name}_steps{num_steps}_w{w:g}.png')
    if storage.exists(path):
      return
    s = self.config.samples
    images = compiled_samplers.class_grid(
        self.store.sampler(mode, sampler), params,
        num_classes=min(self.store.num_classes, s.max_classes), per_class=s.per_class,
        image_shape=self.store.image_shape, w=w, num_steps=num_steps, seed=self.config.seed,
        sharding=sharding.batch_sharding(self.mesh))
    if jax.process_index() == 0:
      save_grid(images, path)
      log(f'wrote {path}')

  def grids_of(self, spec: run_plan.PhaseSpec):
    """The end-of-phase hook that writes a phase's sample grids (``methods.Method.grids``;
    encoders have none)."""
    m = spec.method
    settings = m.grids(self.config, spec)
    if not settings:
      return None

    def on_done(params):
      for w, steps in settings:
        self.write_grid(params, mode=spec.mode, w=w, num_steps=steps,
                        name=spec.name, sampler=m.sampler)
    return on_done

  # ---- quality while training ----------------------------------------------------

  def tracker(self, spec: run_plan.PhaseSpec):
    """``(track(state) -> scores, every)`` of a phase (``config.track``), or (None, 0).

    The phase samples as it is used (``methods.Method.track_steps``): the teacher guided
    and stage 1 at ``track.steps``, an N-step student at N steps, a stochastic-sampler
    student at 2N, a consistency student at 4 steps (or its fewest); encoders do not sample.
    """
    t, m = self.config.track, spec.method
    if not t.enabled or m.track_steps is None:
      return None, 0
    quick = []  # built on first use: a phase that is already finished tracks nothing

    def track(state):
      if not quick:
        from gdistill.eval import quick_fid, sweep  # pylint: disable=g-import-not-at-top
        if self._features is None:  # trains gdistill's classifier if absent (~2 min on CPU)
          self._features = sweep.feature_net_and_stats(
              self.config, os.path.join(self.workdir, sweep.EVAL_DIR), self.source)
        net, stats = self._features
        quick.append(quick_fid.QuickFid(
            feature_net=net, reference=stats['reference'],
            sample_fn=self.store.sampler(spec.mode, m.sampler),
            image_shape=self.store.image_shape,
            num_classes=self.store.num_classes, num_samples=t.num_samples,
            batch_size=t.batch_size, num_steps=m.track_steps(self.config, spec),
            w_values=t.w_values, seed=self.config.eval.seed,
            batch_sharding=sharding.batch_sharding(self.mesh), mode=spec.mode,
            k=self.config.eval.precision_recall_k))
      scores = quick[0](state.eval_params)
      return {k: v for k, v in scores.items() if k != 'sample_seconds'}
    return track, t.teacher_every if spec.kind == run_plan.TEACHER else t.student_every

  # ---- the whole run -----------------------------------------------------------

  def run(self):
    stages = tuple(self.config.stages)
    trained = self.plan.training(
        stages, external_teacher=bool(self.config.teacher_checkpoint or self.store.source))
    names = {p.name for p in trained}
    # Models this run only loads are loaded (and checked) before anything is written.
    inputs = lambda p: [q for q in (p.teacher, p.init_from) if q is not None]
    params = {q: self.store.load(q).params for p in trained for q in inputs(p)
              if q not in names}
    record_config(self.config, self.workdir)
    console.open_log(self.workdir, jax.process_index())  # the workdir is this run's now
    if trained and not self.store.codec.is_identity:  # a latent run trains on stored latents
      self.ctx.source = latents.encode_split(self.source, self.store.codec,
                                             workdir=self.workdir,
                                             codec_params=self.store.codec_params())
    # A distillation step of any kind (stage 1, a halving, an encoder) runs a frozen network
    # twice and updates a student of its size: one rate (README: stage 1 and 2 measured so).
    self.ctx.run = RunProgress(
        [(p.name, 'teacher' if p.kind == run_plan.TEACHER else 'distillation',
          p.num_steps(self.config)) for p in trained],
        more_work=bool({'eval', 'translate'} & set(stages)) or self.config.track.enabled)
    readers = collections.Counter(q for p in trained for q in inputs(p))

    def train(spec):  # keeps a phase's parameters only while a later phase reads them
      out = self.train_phase(spec, params[spec.teacher] if spec.teacher else None,
                             params[spec.init_from] if spec.init_from else None)
      for q in inputs(spec):
        readers[q] -= 1
        if not readers[q]:
          del params[q]
      if readers[spec.name]:
        params[spec.name] = out

    for spec in trained:
      if spec.kind != run_plan.ENCODER:  # encoders: after the evaluation, below
        train(spec)
    if 'eval' in stages:
      from gdistill.eval import sweep  # pylint: disable=g-import-not-at-top
      sweep.run_sweep(self.config, self.store, train_source=self.source)
    if 'translate' in stages:
      for spec in trained:
        if spec.kind == run_plan.ENCODER:
          train(spec)
      from gdistill import translation  # pylint: disable=g-import-not-at-top
      translation.run_stage(self.config, self.workdir)
    self.close()
    log(f'done: {self.workdir}')

  def close(self):
    """Flushes the logs and lets another command write to the workdir."""
    self.writer.close()
    if self._lock is not None:
      workdir_lock.release(self._lock)
      self._lock = None

  def train_phase(self, spec: run_plan.PhaseSpec, teacher_params, init_params=None):
    """Trains (or resumes, or loads the finished) phase; its sampling parameters."""
    if spec.kind == run_plan.TEACHER:
      log(f'teacher: {param_count(self.store.abstract_params(use_w=False)) / 1e6:.2f}M '
          f'parameters')
    phase = self.builder.build(spec, teacher_params, on_done=self.grids_of(spec),
                               init_params=init_params)
    track, every = self.tracker(spec)
    phase = dataclasses.replace(phase, track=track, track_every=every)
    return run_phase(phase, self.ctx)


def train_and_evaluate(config, workdir: str) -> None:
  run = Run(config, workdir)
  try:
    run.run()
  finally:
    run.close()
