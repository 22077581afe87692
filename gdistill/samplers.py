"""Few-step samplers: one ``lax.fori_loop`` with a pluggable step.

Every sampler takes a ``denoise_fn(z_t, t) -> x_hat`` and knows nothing about
models, guidance or configs. The number of steps is a traced argument, so one
compiled sampler serves every step count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gdistill import diffusion, noise_paths

SAMPLERS = ('ddim', 'stochastic', 'consistency')
COSINE = noise_paths.COSINE


def _loop(step, carry, num_steps):
  return jax.lax.fori_loop(0, num_steps, step, carry)


def ddim_update(denoise_fn, z_t, t, s, *, clip: bool = True, path=COSINE):
  """One DDIM step from t to s: (z_s, x_hat), x_hat = clip(denoise_fn(z_t, t)) (clipped
  with ``clip``). The step of ``ddim_sample``, and the guided ODE step of a consistency
  target (``gdistill.consistency``); t and s scalars or [B]."""
  x_hat = _x(denoise_fn, z_t, t, clip)
  return diffusion.ddim_step(z_t=z_t, x_hat=x_hat, logsnr_t=path.logsnr(t),
                             logsnr_s=path.logsnr(s)), x_hat


def ddim_sample(denoise_fn, z_1, *, num_steps, clip: bool = True, path=COSINE):
  """Deterministic N-step DDIM from z_1 ~ N(0, I); returns x_hat of the last step.

  ``path`` (``gdistill.noise_paths``) gives lambda(t); ``clip`` clips x_hat to [-1, 1]
  (pixels; never in a latent space).

  For i = N..1, t = i / N, s = (i - 1) / N:
    x_hat = clip(denoise_fn(z_t, t)),  z_s = alpha_s x_hat + sigma_s (z_t - alpha_t x_hat) / sigma_t.
  """
  n = jnp.asarray(num_steps, jnp.float32)

  def step(i, carry):
    z_t, _ = carry
    t = (n - i) / n
    s = (n - i - 1) / n
    return ddim_update(denoise_fn, z_t, t, s, clip=clip, path=path)

  _, x_hat = _loop(step, (z_1, jnp.zeros_like(z_1)), num_steps)
  return x_hat


def stochastic_sample(denoise_fn, z_1, *, num_steps, rng, clip: bool = True, path=COSINE):
  """The paper's stochastic N-step sampler (N network evaluations).

  Each step from t = i / N goes deterministically to k = t - 2 / N, then back
  to s = t - 1 / N by sampling the forward process:
    z_k = alpha_k x_hat + (sigma_k / sigma_t)(z_t - alpha_t x_hat),
    z_s = (alpha_s / alpha_k) z_k + sigma_{s|k} eps,
    sigma_{s|k}^2 = (1 - exp(lambda_s - lambda_k)) sigma_s^2.
  The last step (t = 1 / N) is deterministic. The jumps are of length 2 / N,
  so ``denoise_fn`` should be an N/2-step student trained on the 1/N grid.
  """
  n = jnp.asarray(num_steps, jnp.float32)

  def update(i, z_t, t, s, noise_rng):
    k = jnp.maximum(t - 2.0 / n, 0.0)
    x_hat = _x(denoise_fn, z_t, t, clip)
    lt, lk, ls = path.logsnr(t), path.logsnr(k), path.logsnr(s)
    z_k = diffusion.ddim_step(z_t=z_t, x_hat=x_hat, logsnr_t=lt, logsnr_s=lk)
    z_s_stoch = diffusion.forward_resample(
        z_k=z_k, logsnr_k=lk, logsnr_s=ls, noise=jax.random.normal(noise_rng, z_t.shape))
    z_s_det = diffusion.ddim_step(z_t=z_t, x_hat=x_hat, logsnr_t=lt, logsnr_s=ls)
    last = i == num_steps - 1
    return jnp.where(last, z_s_det, z_s_stoch), x_hat

  return _noisy_loop(update, z_1, num_steps, rng)


def _x(denoise_fn, z_t, t, clip):
  x = denoise_fn(z_t, t)
  return jnp.clip(x, -1.0, 1.0) if clip else x


def _noisy_loop(update, z_1, num_steps, rng):
  """The loop of a sampler that draws noise each step: for i = 0..N-1, t = (N - i) / N,
  s = t - 1 / N, ``update(i, z_t, t, s, noise_rng) -> (z_s, x)``; returns the last x."""
  n = jnp.asarray(num_steps, jnp.float32)

  def step(i, carry):
    z_t, _, rng = carry
    rng, noise_rng = jax.random.split(rng)
    z_s, x = update(i, z_t, (n - i) / n, (n - i - 1) / n, noise_rng)
    return z_s, x, rng

  _, x, _ = _loop(step, (z_1, jnp.zeros_like(z_1), rng), num_steps)
  return x


def consistency_sample(consistency_fn, z_1, *, num_steps, rng, clip: bool = True,
                       path=COSINE):
  """Multistep consistency sampling (N network evaluations, deterministic given the noise).

  ``consistency_fn(z_t, t)`` maps a noisy point straight to its clean end (a consistency
  student, boundary condition built in). For i = N..1, t = i / N, s = (i - 1) / N:
    x = clip(consistency_fn(z_t, t)),  z_s = alpha_s x + sigma_s eps_i  (fresh noise);
  returns the last x.
  """
  def update(i, z_t, t, s, noise_rng):
    del i
    x = _x(consistency_fn, z_t, t, clip)
    z_s = diffusion.diffuse(x=x, eps=jax.random.normal(noise_rng, z_t.shape),
                            logsnr=jnp.broadcast_to(path.logsnr(s), (z_t.shape[0],)))
    return z_s, x

  return _noisy_loop(update, z_1, num_steps, rng)


def ddim_encode(denoise_fn, x_0, *, num_steps, clean_start=True, path=COSINE):
  """Deterministic DDIM run backwards (t from 0 to 1): image -> noise z_1.

  For i = 0..N-1, s = i / N, t = (i + 1) / N:
    z_t = alpha_t x_hat(z_s) + sigma_t eps_hat(z_s),  eps_hat = (z_s - alpha_s x_hat) / sigma_s
  (``diffusion.ddim_step`` with s and t swapped).

  Args:
    denoise_fn: ``(z_s [B, H, W, C], s []) -> x_hat``; guidance, if any, is inside it.
    x_0: images [B, H, W, C] in [-1, 1].
    num_steps: N (may be traced).
    clean_start: take x_hat(z_0) = z_0 at s = 0 (hence eps_hat = 0) without calling
      ``denoise_fn``: at zero noise the image is its own clean estimate, while the
      network's eps prediction there is unidentifiable. A distilled encoder passes
      False: its first step's eps_hat (= v_hat at lambda_max) is what it was trained to
      output. May be a traced bool.
  Returns:
    z_1 [B, H, W, C].
  """
  n = jnp.asarray(num_steps, jnp.float32)

  def step(i, z_s):
    s = i / n
    t = (i + 1) / n
    # lax.cond, not jnp.where: the skipped first step costs no network evaluation.
    x_hat = jax.lax.cond(jnp.logical_and(i == 0, clean_start), lambda z: z,
                         lambda z: denoise_fn(z, s).astype(z.dtype), z_s)
    return diffusion.ddim_step(z_t=z_s, x_hat=x_hat, logsnr_t=path.logsnr(s),
                               logsnr_s=path.logsnr(t))

  return _loop(step, x_0, num_steps)


def sample(name: str, denoise_fn, z_1, *, num_steps, rng=None, clip: bool = True, path=COSINE):
  """Dispatches to a sampler by name (``ddim``, ``stochastic`` or ``consistency``: then
  ``denoise_fn`` is a consistency function)."""
  if name == 'ddim':
    return ddim_sample(denoise_fn, z_1, num_steps=num_steps, clip=clip, path=path)
  if name in ('stochastic', 'consistency') and rng is None:
    raise ValueError(f'the {name} sampler needs rng')
  if name == 'stochastic':
    return stochastic_sample(denoise_fn, z_1, num_steps=num_steps, rng=rng, clip=clip,
                             path=path)
  if name == 'consistency':
    return consistency_sample(denoise_fn, z_1, num_steps=num_steps, rng=rng, clip=clip,
                              path=path)
  raise ValueError(f'sampler={name!r}: expected one of {SAMPLERS}')
