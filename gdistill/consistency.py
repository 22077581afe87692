"""Guided consistency distillation (LCM-style): the ``consistency`` phase's maths.

The student is a consistency function f(z_t, t, w, c) that maps any point of the guided
probability-flow ODE straight to its clean end. Its boundary condition f(z_0, 0) = z_0 is
built into the parameterisation (Song et al. 2023, LCM):

  f(z_t, t) = c_skip(t) z_t + (1 - c_skip(t)) x_hat(z_t, t, w, c),
  c_skip(t) = sigma_data^2 / (sigma_data^2 + (s t)^2),

exactly 1 at t = 0 (s = 10000: LCM's timestep scaling 10 over 1000 timesteps, so c_skip
is 1.02e-5 at the first grid point t = 1/64 and the network's x_hat is the output
everywhere else).

Training (LCM's skipping-step objective): on a grid of N times t_n = n / N, draw n and
w (as stage 1 draws w), noise an image to t_{n+k}, take one guided DDIM step of the ODE
solver (the guided teacher, or the stage-1 student) from t_{n+k} to t_n, and make the
student's output at z_{t_{n+k}} match the EMA target network's output at that point:

  loss = d( f_theta(z_{t_{n+k}}, t_{n+k}), stop_grad f_theta-(z_hat_{t_n}, t_n) ),

d: L2 or pseudo-Huber (iCT). Sampling is multistep consistency sampling
(``samplers.consistency_sample``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gdistill import guidance, losses, samplers
from gdistill.denoiser import Denoiser

SIGMA_DATA = 0.5
BOUNDARY_SCALE = 10000.0
SOLVERS = ('stage1', 'teacher')
DISTANCES = ('l2', 'pseudo_huber')


def c_skip(t):
  """The weight of z_t in the consistency function: 1 at t = 0, about 1e-5 from t = 1/64."""
  t = jnp.asarray(t, jnp.float32)
  return SIGMA_DATA**2 / (SIGMA_DATA**2 + jnp.square(BOUNDARY_SCALE * t))


def boundary(x_hat, z_t, t):
  """f = c_skip(t) z_t + (1 - c_skip(t)) x_hat; t scalar or [B]."""
  c = jnp.broadcast_to(c_skip(t), (z_t.shape[0],)).reshape((-1,) + (1,) * (z_t.ndim - 1))
  return c * z_t + (1.0 - c) * x_hat


def consistency_fn(net: Denoiser, *, params, cond, w):
  """``f(z_t, t)`` of a consistency student (its sampler's ``denoise_fn``)."""
  x_fn = guidance.conditional_denoise_fn(net, params=params, cond=cond, w=w)
  return lambda z_t, t: boundary(x_fn(z_t, t), z_t, t)


def grid_times(rng, batch: int, *, grid_steps: int, skip: int):
  """(t_{n+k}, t_n) [B] each: n ~ U{0..N-k}, t_n = n / N."""
  n = jax.random.randint(rng, (batch,), 0, grid_steps - skip + 1).astype(jnp.float32)
  return (n + skip) / grid_steps, n / grid_steps


def solver_step(solver_fn, z_hi, t_hi, t_lo, *, clip: bool, path):
  """The solver's guided DDIM step from t_hi to t_lo: the samplers' own
  (``samplers.ddim_update``); ``solver_fn(z, t)`` the guided x_hat (teacher or stage 1)."""
  z_lo, _ = samplers.ddim_update(solver_fn, z_hi, t_hi, t_lo, clip=clip, path=path)
  return z_lo


def consistency_target(*, solver_fn, target_fn, z_hi, t_hi, t_lo, clip: bool, path):
  """stop_grad f_theta-(z_hat_{t_lo}, t_lo), z_hat one solver DDIM step from z_hi."""
  z_lo = solver_step(solver_fn, z_hi, t_hi, t_lo, clip=clip, path=path)
  return jax.lax.stop_gradient(target_fn(z_lo, t_lo))


def consistency_loss(params, frozen, batch, rng, *, student: Denoiser, solver: str,
                     teacher: Denoiser, w_min, w_max, grid_steps: int, skip: int,
                     distance: str, w_balance=False, w_min_frac=0.0, target_params=None):
  """Guided consistency distillation's loss (module docstring).

  ``frozen['params']``: the solver's parameters (the guided ``teacher`` network's, or
  the stage-1 student's: ``student``'s network); ``target_params``: the EMA target
  network's (the update function passes the train state's EMA, or its parameters
  when it keeps none: theta- = stop_grad theta).
  """
  b = batch['image'].shape[0]
  t_rng, eps_rng, w_rng, dropout_rng = jax.random.split(rng, 4)
  t_hi, t_lo = grid_times(t_rng, b, grid_steps=grid_steps, skip=skip)
  w = losses.uniform_w(w_rng, b, w_min, w_max, w_min_frac)
  cond = batch['label']
  if solver == 'teacher':
    solver_fn = guidance.guided_teacher_denoise_fn(teacher, params=frozen['params'], cond=cond,
                                                   w=w)
    clip = teacher.sampler_clips('guided')
  else:
    solver_fn = guidance.conditional_denoise_fn(student, params=frozen['params'], cond=cond, w=w)
    clip = student.sampler_clips('student')
  target_fn = consistency_fn(student, params=target_params, cond=cond, w=w)
  return losses.halving_loss(
      params, frozen, batch, student=student, t=t_hi, w=w, eps_rng=eps_rng,
      dropout_rng=dropout_rng, weighting=distance, w_balance=w_balance, output=boundary,
      target_of=lambda _, z_t, t: consistency_target(
          solver_fn=solver_fn, target_fn=target_fn, z_hi=z_t, t_hi=t, t_lo=t_lo, clip=clip,
          path=student.path))


def bind_loss(config, store, spec):
  """``methods.Method.loss`` of a consistency student (``config.consistency``)."""
  c, cd = config, config.consistency
  return functools.partial(consistency_loss, solver=spec.teacher,
                           teacher=store.denoiser(use_w=False),
                           w_min=c.guidance.w_min, w_max=c.guidance.w_max,
                           grid_steps=int(cd.grid_steps), skip=int(cd.skip),
                           distance=cd.distance, w_balance=bool(cd.w_balance),
                           w_min_frac=float(cd.w_min_frac)), {}
