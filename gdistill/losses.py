"""The three training objectives, as pure functions.

Each loss has the signature ``loss(params, frozen, batch, rng) -> (loss, metrics)``
once its keyword-only hyper-parameters are bound with ``functools.partial``:
``params`` are the trained network's, ``frozen`` the phase's frozen inputs (empty for
the teacher stage), ``batch`` holds ``image`` [B, H, W, C] in [-1, 1] and the condition
``label`` [B] (any pytree with a leading batch axis). The networks are
``gdistill.denoiser.Denoiser``s: every time, log-SNR and network call goes through the
denoiser's noise path. ``shared/METHOD.md`` sections 2-4.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gdistill import diffusion, noise_paths
from gdistill.denoiser import Denoiser
from gdistill.models.unet import w_warmup_scale


def uniform_w(rng, batch, w_min, w_max, w_min_frac=0.0):
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


def _noisy(path, x, t_rng, eps_rng, t=None):
  """t (drawn from the path's training times unless given), lambda(t) and z_t, [B]."""
  if t is None:
    t = path.sample_t(t_rng, x.shape[0])
  logsnr = path.logsnr(t)
  return t, logsnr, diffusion.diffuse(x=x, eps=jax.random.normal(eps_rng, x.shape), logsnr=logsnr)


def teacher_loss(params, frozen, batch, rng, *, net: Denoiser, p_uncond, weighting):
  """Classifier-free-guidance teacher: denoising loss with label dropout.

  t ~ the path's training times, z_t = alpha_t x + sigma_t eps, c -> null with
  probability p_uncond; loss = E[omega(lambda_t) ||x_hat(z_t, c) - x||^2].
  """
  del frozen
  x, cond = batch['image'], batch['label']
  b = x.shape[0]
  t_rng, eps_rng, drop_rng, dropout_rng = jax.random.split(rng, 4)
  t, logsnr, z_t = _noisy(net.path, x, t_rng, eps_rng)
  drop = jax.random.uniform(drop_rng, (b,)) < p_uncond
  cond = net.condition(cond)
  cond = jax.tree.map(lambda n, c: jnp.where(drop.reshape((b,) + (1,) * (c.ndim - 1)), n, c),
                      net.null_like(cond), cond)
  x_hat = net.x_hat(params, z_t, t=t, logsnr=logsnr, cond=cond, train=True,
                    rngs={'dropout': dropout_rng}, raw_cond=True)
  per_example = diffusion.weighted_x_mse(x_hat=x_hat, x_target=x, logsnr=logsnr,
                                         weighting=weighting)
  return per_example.mean(), {}


def stage1_target(*, teacher: Denoiser, teacher_params, z_t, t, logsnr, cond, w):
  """The guided teacher's combined prediction x_hat^w_theta(z_t, c), no gradient."""
  x = teacher.guided_x_hat(teacher_params, z_t, t=t, logsnr=logsnr, cond=cond, w=w)
  return jax.lax.stop_gradient(x)


# Distances of a student's output from its target besides the weighted x-MSE
# (diffusion.LOSS_WEIGHTINGS): plain L2 (mean over pixels) and iCT's pseudo-Huber.
DISTANCES = ('l2', 'pseudo_huber')


def _per_example(x_hat, x_target, logsnr, weighting):
  """[B]: omega(lambda) mean ||x_hat - x_target||^2 for a loss weighting; 'l2': the mean
  squared error; 'pseudo_huber': sqrt(||x_hat - x_target||^2 + c^2) - c, c = 0.00054
  sqrt(dimensions) (Song & Dhariwal 2023, for data in [-1, 1])."""
  if weighting not in DISTANCES:
    return diffusion.weighted_x_mse(x_hat=x_hat, x_target=x_target, logsnr=logsnr,
                                    weighting=weighting)
  axes = tuple(range(1, x_hat.ndim))
  sq = jnp.square(x_hat - x_target)
  if weighting == 'l2':
    return jnp.mean(sq, axis=axes)
  c = 0.00054 * jnp.sqrt(float(x_hat[0].size))
  return jnp.sqrt(jnp.sum(sq, axis=axes) + c * c) - c


def _student_loss(student: Denoiser, params, *, x_target, z_t, t, logsnr, cond, w, dropout_rng,
                  weighting, w_balance, w_scale=None, output=None):
  """omega(lambda_t) ||x_hat_student(z_t, c, w) - x_target||^2 (/ (1 + w)^2 with
  ``w_balance``), averaged over the batch: the skeleton of every distillation loss.
  ``w_scale``: the factor on the student's w branch (its warm-up), None for none;
  ``output(x_hat, z_t, t)``: the student's output made of its x_hat (a consistency
  function's boundary condition), None for x_hat itself; ``weighting``: a loss weighting
  or one of DISTANCES."""
  x_hat = student.x_hat(params, z_t, t=t, logsnr=logsnr, cond=cond, w=w, train=True,
                        rngs={'dropout': dropout_rng}, w_scale=w_scale)
  if output is not None:
    x_hat = output(x_hat, z_t, t)
  per_example = _per_example(x_hat, x_target, logsnr, weighting)
  if w_balance:
    per_example = _w_balanced(per_example, w)
  return per_example.mean(), {}


def stage1_loss(params, frozen, batch, rng, *, student: Denoiser, teacher: Denoiser, w_min,
                w_max, weighting, w_balance=False, w_min_frac=0.0, w_warmup_steps=0, step=None):
  """Stage 1: a w-conditioned student matches the guided teacher for every w.

  t ~ the teacher path's training times, w ~ U[w_min, w_max] (a ``w_min_frac`` of
  examples at w_min exactly); with ``w_warmup_steps`` the student's w branch is scaled by
  min(1, step / w_warmup_steps) (the authors' warm-up; ``step``: the update count);
  loss = E[omega(lambda_t) ||x_hat_eta1(z_t, c, w) - x_hat^w_theta(z_t, c)||^2].
  """
  x, cond = batch['image'], batch['label']
  b = x.shape[0]
  t_rng, eps_rng, w_rng, dropout_rng = jax.random.split(rng, 4)
  t, logsnr, z_t = _noisy(teacher.path, x, t_rng, eps_rng)
  w = uniform_w(w_rng, b, w_min, w_max, w_min_frac)
  x_target = stage1_target(teacher=teacher, teacher_params=frozen['params'], z_t=z_t, t=t,
                           logsnr=logsnr, cond=cond, w=w)
  return _student_loss(student, params, x_target=x_target, z_t=z_t, t=t, logsnr=logsnr,
                       cond=cond, w=w, dropout_rng=dropout_rng, weighting=weighting,
                       w_balance=w_balance, w_scale=w_warmup_scale(step, w_warmup_steps))


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


def stage2_target(x_fn, *, z_t, t, student_steps, path=noise_paths.COSINE):
  """Two teacher DDIM steps of 1/(2N) from t, and the x_tilde one student step needs.

  x1 = x_fn(z_t, t);   z_t'  = alpha_t'  x1 + (sigma_t'  / sigma_t ) (z_t  - alpha_t  x1)
  x2 = x_fn(z_t', t'); z_t'' = alpha_t'' x2 + (sigma_t'' / sigma_t') (z_t' - alpha_t' x2)
  x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),
  with t' = max(t - 1/(2N), 0), t'' = max(t - 1/N, 0). Where t'' = 0 the target is
  the teacher's last prediction (x2, or x1 where already t' = 0).
  ``x_fn(z, t)`` maps z [B, H, W, C] and t [B] to x_hat; ``path`` gives lambda(t).
  """
  n = jnp.asarray(student_steps, jnp.float32)
  t1 = jnp.maximum(t - 0.5 / n, 0.0)
  t2 = jnp.maximum(t - 1.0 / n, 0.0)
  lt, l1, l2 = (path.logsnr(s) for s in (t, t1, t2))
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


def halving_loss(params, frozen, batch, *, student: Denoiser, t, w, eps_rng, dropout_rng,
                 target_of, weighting, w_balance=False, output=None):
  """A student's output at z_t matches a target made by its frozen teacher from z_t: a
  decoder (stage 2) or encoder halving, or a consistency step (``gdistill.consistency``).

  ``t`` [B]: the student's times; ``w`` [B]; ``target_of(x_fn, z_t, t)``: the target (a
  halving's x_tilde of two teacher steps from t), where ``x_fn(z, s)`` is the teacher
  (``frozen['params']``, the same network, the same c and w); ``output``: as
  ``_student_loss``'s.
  loss = E[omega(lambda_t) ||x_hat_student(z_t, c, w) - x_tilde||^2].
  """
  x, cond = batch['image'], batch['label']
  t, logsnr, z_t = _noisy(student.path, x, None, eps_rng, t=t)

  def teacher_x(z, s):
    return student.x_hat(frozen['params'], z, t=s, logsnr=student.path.logsnr(s), cond=cond,
                         w=w)

  x_target = target_of(teacher_x, z_t, t)
  return _student_loss(student, params, x_target=x_target, z_t=z_t, t=t, logsnr=logsnr,
                       cond=cond, w=w, dropout_rng=dropout_rng, weighting=weighting,
                       w_balance=w_balance, output=output)


def stage2_loss(params, frozen, batch, rng, *, student: Denoiser, w_min, w_max, grid, weighting,
                w_balance=False, w_min_frac=0.0):
  """Stage 2: one student step from t matches two teacher steps (w kept as input).

  ``frozen`` holds the teacher's ``params`` and the student's step count
  ``num_steps`` (a traced scalar, so all halvings share one compiled step).
  loss = E[omega(lambda_t) ||x_hat_student(z_t, c, w) - x_tilde||^2], w drawn as in
  stage 1 (a ``w_min_frac`` of the examples at w_min exactly).
  """
  b = batch['image'].shape[0]
  t_rng, eps_rng, w_rng, dropout_rng = jax.random.split(rng, 4)
  n = frozen['num_steps']
  return halving_loss(
      params, frozen, batch, student=student, weighting=weighting, w_balance=w_balance,
      t=stage2_time_grid(t_rng, b, student_steps=n, grid=grid),
      w=uniform_w(w_rng, b, w_min, w_max, w_min_frac), eps_rng=eps_rng, dropout_rng=dropout_rng,
      target_of=lambda x_fn, z_t, t: stage2_target(x_fn, z_t=z_t, t=t, student_steps=n,
                                                   path=student.path))


# ---- binders (``methods.Method.loss``): a kind's loss bound to all but the student ------

def weighting(config, section) -> str:
  """A phase's loss weighting: its section's ``weighting``, else ``diffusion.weighting``."""
  return section.get('weighting', '') or config.diffusion.weighting


def bind_stage1(config, store, spec):
  del spec
  c = config
  return functools.partial(
      stage1_loss, teacher=store.denoiser(use_w=False),
      w_min=c.guidance.w_min, w_max=c.guidance.w_max,
      weighting=weighting(c, c.stage1), w_balance=c.stage1.get('w_balance', False),
      w_min_frac=float(c.stage1.get('w_min_frac', 0.0)),
      w_warmup_steps=int(c.model.get('w_warmup_steps', 0))), {}


def _bind_halving(config, section, grid):
  return functools.partial(stage2_loss, w_min=config.guidance.w_min, w_max=config.guidance.w_max,
                           grid=grid, weighting=weighting(config, section),
                           w_balance=section.get('w_balance', False),
                           w_min_frac=float(section.get('w_min_frac', 0.0))), {}


def bind_stage2(config, store, spec):
  del store, spec
  return _bind_halving(config, config.stage2, config.stage2.time_grid)


def bind_stochastic(config, store, spec):
  """A stochastic-sampler student: a halving trained at every point of the 1/(2N) grid
  (``both``), the stochastic sampler's jumps of 1/N from each (METHOD.md section 5)."""
  del store, spec
  return _bind_halving(config, config.stage2.stochastic, 'both')
