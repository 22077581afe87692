"""The training state and the one generic update function every stage uses."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  """step: scalar int32; params; opt_state; ema_params (None when EMA is off)."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Optional[Any] = None

  @property
  def eval_params(self):
    """The parameters to sample with: the EMA if kept, else the raw ones."""
    return self.params if self.ema_params is None else self.ema_params


def make_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int, decay: str,
                   grad_clip: float, b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
  """Adam with linear warm-up, then constant or linear decay to 0, after global-norm clipping."""
  if decay == 'constant':
    after = optax.constant_schedule(learning_rate)
  elif decay == 'linear':
    after = optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup_steps, 1))
  else:
    raise ValueError(f'decay={decay!r}: expected "constant" or "linear"')
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)), after], [warmup_steps])
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.scale_by_adam(b1=b1, b2=b2),
                     optax.scale_by_learning_rate(schedule))


def init_state(params, optimizer: optax.GradientTransformation, *, ema: bool) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    ema_params=jax.tree.map(jnp.copy, params) if ema else None)


def make_update_fn(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                   ema_decay: float, ema_warmup: bool = False, pass_step: bool = False,
                   pass_target: bool = False) -> Callable:
  """Builds ``update_fn(state, frozen, batch, rng) -> (state, metrics)``.

  ``loss_fn(params, frozen, batch, rng) -> (loss, aux_metrics)``. With ``ema_warmup``
  the EMA's decay at update k (1, 2, ...) is min(ema_decay, (1 + k) / (10 + k)), so the
  average forgets the initial parameters within the first hundreds of updates instead of
  keeping ema_decay^k of them (0.22 after 1500 updates at 0.999). The step's
  randomness is ``fold_in(rng, state.step)``, so a resumed run draws exactly
  what an uninterrupted one would. ``pass_step``: the loss also gets ``step=state.step``
  (the update count, restored on resume), e.g. for the w embedding's warm-up.
  ``pass_target``: the loss also gets ``target_params``, the EMA parameters (a consistency
  loss's target network), or the parameters themselves, not differentiated, without EMA.
  """
  def update_fn(state: TrainState, frozen, batch, rng):
    step_rng = jax.random.fold_in(rng, state.step)
    kwargs = {'step': state.step} if pass_step else {}
    if pass_target:
      kwargs['target_params'] = state.eval_params
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, frozen, batch, step_rng, **kwargs)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      decay = ema_decay
      if ema_warmup:
        k = (state.step + 1).astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + k) / (10.0 + k))
      ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), **aux}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema), metrics
  return update_fn
