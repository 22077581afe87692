"""Progressive distillation of the DDIM encoder (the reverse process), as pure functions.

For image-to-image translation an image is encoded to noise by DDIM run
backwards, t from 0 to 1, under its source condition (``shared/METHOD.md``
section 6). Like the decoder, this encoder is distilled by halving: one
student step of 1/M from s matches two teacher steps of 1/(2M). The first
teacher is the stage-1 (w-conditioned) model queried at a fixed w (``encode_w``);
each student starts as a copy of its teacher.

``encoder_distill_loss`` has the signature of ``losses.stage2_loss`` and runs in
the same generic loop; the encoder phases' names and step counts are
``gdistill.run_plan``'s.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gdistill import diffusion, losses, noise_paths
from gdistill.denoiser import Denoiser


def encoder_time_grid(rng, batch, *, student_steps, grid):
  """Start times s of the student's encoder steps, shape [B].

  ``deterministic``: s = i / M, i ~ U{0..M-1} (what its M-step encoder queries).
  ``both``: s = i / (2M), i ~ U{0..2M-2}: the finer grid as well, every s with
  s + 1/M <= 1.
  """
  m = jnp.asarray(student_steps, jnp.float32)
  if grid == 'deterministic':
    return jax.random.randint(rng, (batch,), 0, student_steps).astype(jnp.float32) / m
  if grid == 'both':
    i = jax.random.randint(rng, (batch,), 0, 2 * student_steps - 1)
    return i.astype(jnp.float32) / (2.0 * m)
  raise ValueError(f'translate.encoder.time_grid={grid!r}: expected "deterministic" or "both"')


def encoder_target(x_fn, *, z_s, s, student_steps, clean_start, path=noise_paths.COSINE):
  """Two teacher reverse-DDIM steps of 1/(2M) from s, and the x_tilde one student step needs.

  t' = s + 1/(2M), t'' = s + 1/M (at most 1):
    x1 = x_fn(z_s, s);    z_t'  = alpha_t'  x1 + (sigma_t'  / sigma_s ) (z_s  - alpha_s  x1)
    x2 = x_fn(z_t', t');  z_t'' = alpha_t'' x2 + (sigma_t'' / sigma_t') (z_t' - alpha_t' x2)
    x_tilde = (z_t'' - (sigma_t'' / sigma_s) z_s) / (alpha_t'' - (sigma_t'' / sigma_s) alpha_s).
  The reverse step is the DDIM step formula with the times swapped, so its inverse is
  ``diffusion.distillation_target`` unchanged. Its denominator is
  sigma_t'' (exp(lambda_t'' / 2) - exp(lambda_s / 2)), never 0 for t'' > s: unlike the
  decoder, no step needs a special case. With ``clean_start`` (a teacher that is a
  DDIM encoder, ``samplers.ddim_encode``), x1 = z_s where s = 0.

  Args:
    x_fn: ``x_fn(z [B, H, W, C], t [B]) -> x_hat``, the teacher.
    z_s: [B, H, W, C] on the forward process at s.
    s: [B] start times on the student's grid.
    student_steps: M (may be traced).
    clean_start: bool (may be traced).
    path: the noise path (``gdistill.noise_paths``) that gives lambda(t).
  Returns:
    x_tilde [B, H, W, C], no gradient.
  """
  m = jnp.asarray(student_steps, jnp.float32)
  t1 = jnp.minimum(s + 0.5 / m, 1.0)
  t2 = jnp.minimum(s + 1.0 / m, 1.0)
  ls, l1, l2 = (path.logsnr(u) for u in (s, t1, t2))
  first_clean = jnp.logical_and(clean_start, s == 0).reshape(s.shape + (1,) * (z_s.ndim - 1))
  x1 = jnp.where(first_clean, z_s, x_fn(z_s, s))
  z_1 = diffusion.ddim_step(z_t=z_s, x_hat=x1, logsnr_t=ls, logsnr_s=l1)
  x2 = x_fn(z_1, t1)
  z_2 = diffusion.ddim_step(z_t=z_1, x_hat=x2, logsnr_t=l1, logsnr_s=l2)
  x_tilde = diffusion.distillation_target(z_t=z_s, z_target=z_2, logsnr_t=ls, logsnr_target=l2)
  return jax.lax.stop_gradient(x_tilde)


def encoder_distill_loss(params, frozen, batch, rng, *, student: Denoiser, encode_w, grid,
                         weighting):
  """One student encoder step from s matches two teacher encoder steps.

  ``frozen`` holds the teacher's ``params``, the student's step count ``num_steps``
  and ``clean_start`` (traced scalars, so all halvings share one compiled step).
  The condition is the image's own label (the source class) at w = ``encode_w``;
  z_s = alpha_s x + sigma_s eps with x from data: the encoder's trajectories follow
  the forward marginals (``losses.halving_loss`` with reverse-time targets).
  loss = E[omega(lambda_s) ||x_hat_student(z_s, c, w) - x_tilde||^2].
  At s = 0 the student's x_hat must differ from z_0 by sigma_0 eps_hat: use a
  v- or eps-parameterised network (``diffusion.mean_type``), not x.
  """
  b = batch['image'].shape[0]
  s_rng, eps_rng, dropout_rng = jax.random.split(rng, 3)
  m = frozen['num_steps']
  return losses.halving_loss(
      params, frozen, batch, student=student, weighting=weighting,
      t=encoder_time_grid(s_rng, b, student_steps=m, grid=grid),
      w=jnp.full((b,), encode_w, jnp.float32), eps_rng=eps_rng, dropout_rng=dropout_rng,
      target_of=lambda x_fn, z_s, s: encoder_target(
          x_fn, z_s=z_s, s=s, student_steps=m, clean_start=frozen['clean_start'],
          path=student.path))


def bind_loss(config, store, spec):
  """``methods.Method.loss`` of a distilled encoder. The first encoder's teacher is a DDIM
  encoder (x_hat(z_0) = z_0), a distilled encoder's is not."""
  del store
  c = config
  return functools.partial(encoder_distill_loss, encode_w=float(c.translate.encode_w),
                           grid=c.translate.encoder.time_grid,
                           weighting=losses.weighting(c, c.translate.encoder)), \
      {'clean_start': jnp.bool_(spec.teacher == 'stage1')}
