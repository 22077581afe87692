"""Turns a phase of the run plan into what the loop trains: ``loop.Phase``.

For each kind of phase (``gdistill.methods``): its loss, optimiser, initial state,
frozen inputs and checkpoint meta. Frozen inputs are what a phase reads but never
trains: the teacher's parameters and, for halvings, the student's step count (a
traced scalar, so all halvings share one compiled step). Each kind's loss binding, meta
and EMA-target need come from its ``methods.Method`` entry.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from gdistill import losses, run_plan, sharding
from gdistill.loop import Phase
from gdistill.model_store import ModelStore
from gdistill.networks import init_params
from gdistill.run_plan import PhaseSpec
from gdistill.train_state import init_state, make_optimizer, make_update_fn


def meta(config, store: ModelStore, spec: PhaseSpec) -> dict:
  """The JSON saved with each checkpoint of a phase: what its network is."""
  s = spec.section(config)
  out = {'phase': spec.name, 'model': store.model_meta(use_w=spec.use_w), 'use_w': spec.use_w,
         'mean_type': store.mean_type, 'num_classes': store.num_classes,
         'image_shape': list(store.image_shape), 'dataset': config.data.name,
         'has_ema': s.ema_decay > 0, 'student_steps': spec.student_steps,
         'w_range': [config.guidance.w_min, config.guidance.w_max]}
  return out | spec.method.meta(config, spec) | store.codec_meta()


weighting = losses.weighting  # a phase's loss weighting (its section's, else the default)


def optimizer(s, num_steps: int):
  return make_optimizer(learning_rate=s.learning_rate, warmup_steps=s.warmup_steps,
                        total_steps=num_steps, decay=s.lr_decay, grad_clip=s.grad_clip)


class PhaseBuilder:
  """Builds the loop's phases of one run; phases of one section and loss share one
  update function (so the halvings of stage 2 share one compiled step)."""

  def __init__(self, config, store: ModelStore):
    self.config, self.store = config, store
    self._updates = {}

  def build(self, spec: PhaseSpec, teacher_params=None,
            on_done: Optional[Callable] = None, init_params=None) -> Phase:
    """The loop phase of ``spec``; ``teacher_params``: the sampling parameters of
    ``spec.teacher`` (None for the teacher); ``init_params``: those of
    ``spec.init_from``, when the phase starts from another phase than its teacher."""
    if spec.kind == run_plan.TEACHER:
      return self._teacher(spec, on_done)
    repl = sharding.replicated(self.store.mesh)
    frozen = {'params': teacher_params}
    if spec.init_from is not None:
      frozen['init_params'] = init_params
    if spec.student_steps is not None:
      frozen['num_steps'] = jax.device_put(jnp.int32(spec.student_steps), repl)
    loss, more = spec.method.bind_loss(self.config, self.store, spec)
    frozen |= {k: jax.device_put(v, repl) for k, v in more.items()}
    return self._student(spec, loss, frozen, on_done)

  def _teacher(self, spec, on_done) -> Phase:
    c, net = self.config.teacher, self.store.net(use_w=False)
    opt = optimizer(c, c.num_steps)
    loss = functools.partial(losses.teacher_loss, net=self.store.denoiser(use_w=False),
                             p_uncond=c.p_uncond, weighting=weighting(self.config, c))
    seed, image_shape = self.config.seed, self.store.image_shape

    def init_fn(frozen):
      del frozen
      return init_state(init_params(net, jax.random.PRNGKey(seed), image_shape), opt,
                        ema=c.ema_decay > 0)

    key = (id(c), losses.teacher_loss)
    if key not in self._updates:
      self._updates[key] = make_update_fn(loss, opt, ema_decay=c.ema_decay,
                                          ema_warmup=c.ema_warmup)
    return Phase(name=spec.name, num_steps=c.num_steps, batch_size=c.batch_size,
                 init_fn=init_fn, update_fn=self._updates[key],
                 frozen={}, meta=meta(self.config, self.store, spec),
                 checkpoint_every=c.checkpoint_every, on_done=on_done)

  def _student(self, spec, loss, frozen, on_done) -> Phase:
    """A w-conditioned student initialised (``methods.Method.init``) from
    ``frozen['init_params']`` if given, else ``frozen['params']``: stage 1 from the
    teacher's weights (plus a zero-initialised w branch), a halving or a consistency
    student as an exact copy of the phase it starts from."""
    s = spec.section(self.config)
    student = self.store.denoiser(use_w=True, dropout=s.dropout)
    num_steps = spec.num_steps(self.config)
    opt = optimizer(s, num_steps)
    key = (id(s), loss.func, num_steps)  # the learning-rate schedule spans the phase
    if key not in self._updates:
      self._updates[key] = make_update_fn(
          functools.partial(loss, student=student), opt, ema_decay=s.ema_decay,
          ema_warmup=s.ema_warmup, pass_step=loss.keywords.get('w_warmup_steps', 0) > 0,
          pass_target=spec.method.pass_target)
    seed, store = self.config.seed, self.store
    init = spec.method.init
    start = 'init_params' if spec.init_from is not None else 'params'

    def init_fn(frozen):
      if init == 'teacher_net' or (init == 'copy' and spec.start_from == run_plan.TEACHER):
        params = store.init_student(jax.random.PRNGKey(seed + 1), frozen[start])
      else:
        params = jax.tree.map(jnp.copy, frozen[start])
      return init_state(params, opt, ema=s.ema_decay > 0)

    return Phase(name=spec.name, num_steps=num_steps, batch_size=s.batch_size,
                 init_fn=init_fn, update_fn=self._updates[key], frozen=frozen,
                 meta=meta(self.config, self.store, spec),
                 checkpoint_every=s.checkpoint_every, on_done=on_done)
