"""The three training objectives, as pure functions.

Each loss has the signature ``loss(params, frozen, batch, rng) -> (loss, metrics)``
once its keyword-only hyper-parameters are bound with ``functools.partial``:
``params`` are the trained network's, ``frozen`` the phase's frozen inputs (empty for
the teacher stage), ``batch`` holds ``image`` [B, H, W, C] in [-1, 1] and
``label`` [B]. ``shared/METHOD.md`` sections 2-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gdistill import diffusion
from gdistill.guidance import guided_x_hat, model_x_hat


def _uniform_w(rng, batch, w_min, w_max, w_min_frac=0.0):
  """w ~ U[w_min, w_max]; with ``w_min_frac`` > 0 that fraction of examples (in
  expectation) is drawn at exactly w_min instead."""
  w = jax.random.uniform(rng, (batch,), minval=w_min, maxval=w_max)
  if w_min_frac > 0:
    at_min = jax.random.bernoulli(jax.random.fold_in(rng, 1), w_min_frac, (batch,))
    w = jnp.where(at_min, jnp.asarray(w_min, w.dtype), w)
  return w


def _w_balanced(per_example, w):
  """``w_balance``: each example's loss / (1 + w)^2, since a guided target's distance
  from the conditional one grows with w, so the large-w examples do not drown the rest."""
  return per_example / jnp.square(1.0 + w)


def teacher_loss(params, frozen, batch, rng, *, apply_fn, mean_type, num_classes, p_uncond,
                 weighting):
  """Classifier-free-guidance teacher: denoising loss with label dropout.

  t ~ U[0, 1], z_t = alpha_t x + sigma_t eps, c -> null with probability p_uncond;
  loss = E[omega(lambda_t) ||x_hat(z_t, c) - x||^2].
  """
  del frozen
  x, label = batch['image'], batch['label']
  b = x.shape[0]
  t_rng, eps_rng, drop_rng, dropout_rng = jax.random.split(rng, 4)
  logsnr = diffusion.logsnr_schedule_cosine(jax.random.uniform(t_rng, (b,)))
  eps = jax.random.normal(eps_rng, x.shape)
  z_t = diffusion.diffuse(x=x, eps=eps, logsnr=logsnr)
  drop = jax.random.uniform(drop_rng, (b,)) < p_uncond
  label = jnp.where(drop, num_classes, label)
  x_hat = model_x_hat(apply_fn=apply_fn, params=params, z_t=z_t, logsnr=logsnr, label=label,
                      mean_type=mean_type, train=True, rngs={'dropout': dropout_rng})
  per_example = diffusion.weighted_x_mse(x_hat=x_hat, x_target=x, logsnr=logsnr,
                                         weighting=weighting)
  return per_example.mean(), {}


def stage1_target(*, teacher_apply, teacher_params, z_t, logsnr, label, w, num_classes,
                  mean_type):
  """The guided teacher's combined prediction x_hat^w_theta(z_t, c), no gradient."""
  x = guided_x_hat(apply_fn=teacher_apply, params=teacher_params, z_t=z_t, logsnr=logsnr,
                   label=label, w=w, num_classes=num_classes, mean_type=mean_type)
  return jax.lax.stop_gradient(x)


def stage1_loss(params, frozen, batch, rng, *, apply_fn, teacher_apply, mean_type,
                teacher_mean_type, num_classes, w_min, w_max, weighting, w_balance=False,
                w_min_frac=0.0):
  """Stage 1: a w-conditioned student matches the guided teacher for every w.

  t ~ U[0, 1], w ~ U[w_min, w_max] (a ``w_min_frac`` of examples at w_min exactly);
  loss = E[omega(lambda_t) ||x_hat_eta1(z_t, c, w) - x_hat^w_theta(z_t, c)||^2].
  """
  x, label = batch['image'], batch['label']
  b = x.shape[0]
  t_rng, eps_rng, w_rng, dropout_rng = jax.random.split(rng, 4)
  logsnr = diffusion.logsnr_schedule_cosine(jax.random.uniform(t_rng, (b,)))
  z_t = diffusion.diffuse(x=x, eps=jax.random.normal(eps_rng, x.shape), logsnr=logsnr)
  w = _uniform_w(w_rng, b, w_min, w_max, w_min_frac)
  x_target = stage1_target(teacher_apply=teacher_apply, teacher_params=frozen['params'],
                           z_t=z_t, logsnr=logsnr, label=label, w=w, num_classes=num_classes,
                           mean_type=teacher_mean_type)
  x_hat = model_x_hat(apply_fn=apply_fn, params=params, z_t=z_t, logsnr=logsnr, label=label,
                      w=w, mean_type=mean_type, train=True, rngs={'dropout': dropout_rng})
  per_example = diffusion.weighted_x_mse(x_hat=x_hat, x_target=x_target, logsnr=logsnr,
                                         weighting=weighting)
  if w_balance:
    per_example = _w_balanced(per_example, w)
  return per_example.mean(), {}


def stage2_time_grid(rng, batch, *, student_steps, grid):
  """Times t at which an N-step student is trained, shape [B].

  ``deterministic``: t = i / N, i ~ U{1..N} (what its DDIM sampler queries).
  ``both``: t = i / (2N), i ~ U{1..2N}: also the points the stochastic sampler
  queries with jumps of 1/N (METHOD.md section 5).
  """
  n = jnp.asarray(student_steps, jnp.float32)
  if grid == 'deterministic':
    i = jax.random.randint(rng, (batch,), 1, student_steps + 1)
    return i.astype(jnp.float32) / n
  if grid == 'both':
    i = jax.random.randint(rng, (batch,), 1, 2 * student_steps + 1)
    return i.astype(jnp.float32) / (2.0 * n)
  raise ValueError(f'stage2.time_grid={grid!r}: expected "deterministic" or "both"')


def stage2_target(x_fn, *, z_t, t, student_steps):
  """Two teacher DDIM steps of 1/(2N) from t, and the x_tilde one student step needs.

  x1 = x_fn(z_t, t);   z_t'  = alpha_t'  x1 + (sigma_t'  / sigma_t ) (z_t  - alpha_t  x1)
  x2 = x_fn(z_t', t'); z_t'' = alpha_t'' x2 + (sigma_t'' / sigma_t') (z_t' - alpha_t' x2)
  x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),
  with t' = max(t - 1/(2N), 0), t'' = max(t - 1/N, 0). Where t'' = 0 the target is
  the teacher's last prediction (x2, or x1 where already t' = 0).
  ``x_fn(z, t)`` maps z [B, H, W, C] and t [B] to x_hat.
  """
  n = jnp.asarray(student_steps, jnp.float32)
  t1 = jnp.maximum(t - 0.5 / n, 0.0)
  t2 = jnp.maximum(t - 1.0 / n, 0.0)
  lt, l1, l2 = (diffusion.logsnr_schedule_cosine(s) for s in (t, t1, t2))
  x1 = x_fn(z_t, t)
  z_1 = diffusion.ddim_step(z_t=z_t, x_hat=x1, logsnr_t=lt, logsnr_s=l1)
  x2 = x_fn(z_1, t1)
  z_2 = diffusion.ddim_step(z_t=z_1, x_hat=x2, logsnr_t=l1, logsnr_s=l2)
  # Where t'' = 0, the formula divides by ~0: compute it on a safe logsnr and mask it out.
  safe_l2 = jnp.where(t2 > 0, l2, l1)
  x_tilde = diffusion.distillation_target(z_t=z_t, z_target=z_2, logsnr_t=lt,
                                          logsnr_target=safe_l2)
  bcast = lambda m: m.reshape(m.shape + (1,) * (z_t.ndim - 1))
  last = jnp.where(bcast(t1 > 0), x2, x1)
  return jax.lax.stop_gradient(jnp.where(bcast(t2 > 0), x_tilde, last))


def stage2_loss(params, frozen, batch, rng, *, apply_fn, mean_type, w_min, w_max, grid,
                weighting, w_balance=False):
  """Stage 2: one student step from t matches two teacher steps (w kept as input).

  ``frozen`` holds the teacher's ``params`` and the student's step count
  ``num_steps`` (a traced scalar, so all halvings share one compiled step).
  loss = E[omega(lambda_t) ||x_hat_student(z_t, c, w) - x_tilde||^2].
  """
  x, label = batch['image'], batch['label']
  b = x.shape[0]
  t_rng, eps_rng, w_rng, dropout_rng = jax.random.split(rng, 4)
  n = frozen['num_steps']
  t = stage2_time_grid(t_rng, b, student_steps=n, grid=grid)
  logsnr = diffusion.logsnr_schedule_cosine(t)
  z_t = diffusion.diffuse(x=x, eps=jax.random.normal(eps_rng, x.shape), logsnr=logsnr)
  w = _uniform_w(w_rng, b, w_min, w_max)

  def teacher_x(z, s):
    return model_x_hat(apply_fn=apply_fn, params=frozen['params'], z_t=z,
                       logsnr=diffusion.logsnr_schedule_cosine(s), label=label, w=w,
                       mean_type=mean_type)

  x_target = stage2_target(teacher_x, z_t=z_t, t=t, student_steps=n)
  x_hat = model_x_hat(apply_fn=apply_fn, params=params, z_t=z_t, logsnr=logsnr, label=label,
                      w=w, mean_type=mean_type, train=True, rngs={'dropout': dropout_rng})
  per_example = diffusion.weighted_x_mse(x_hat=x_hat, x_target=x_target, logsnr=logsnr,
                                         weighting=weighting)
  if w_balance:
    per_example = _w_balanced(per_example, w)
  return per_example.mean(), {}
