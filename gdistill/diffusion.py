"""Variance-preserving diffusion maths in the paper's notation.

Everything here is a small pure function of arrays. Time ``t`` lies in [0, 1];
the noise level is described by the log signal-to-noise ratio
``logsnr = lambda_t = log(alpha_t^2 / sigma_t^2)``.

Reference: Salimans & Ho, "Progressive Distillation for Fast Sampling of
Diffusion Models" (2022); Meng et al., "On Distillation of Guided Diffusion
Models" (2023). ``shared/METHOD.md`` sections 1-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0


def logsnr_schedule_cosine(t, *, logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX):
  """Truncated cosine schedule.

  b = arctan(exp(-lambda_max / 2)), a = arctan(exp(-lambda_min / 2)) - b,
  lambda(t) = -2 log tan(a t + b), so lambda(0) = lambda_max, lambda(1) = lambda_min.
  """
  b = jnp.arctan(jnp.exp(-0.5 * logsnr_max))
  a = jnp.arctan(jnp.exp(-0.5 * logsnr_min)) - b
  return -2.0 * jnp.log(jnp.tan(a * jnp.asarray(t, jnp.float32) + b))


def alpha_sigma(logsnr):
  """alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)."""
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def bcast(v, like):
  """Broadcasts a per-example [B] (or scalar) value against an image batch."""
  v = jnp.asarray(v)
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def diffuse(*, x, eps, logsnr):
  """Forward process q(z_t | x): z_t = alpha_t x + sigma_t eps."""
  alpha, sigma = alpha_sigma(logsnr)
  return bcast(alpha, x) * x + bcast(sigma, x) * eps


def x_from_eps(*, z_t, eps, logsnr):
  """x_hat = (z_t - sigma eps_hat) / alpha."""
  alpha, sigma = alpha_sigma(logsnr)
  return (z_t - bcast(sigma, z_t) * eps) / bcast(alpha, z_t)


def eps_from_x(*, z_t, x, logsnr):
  """eps_hat = (z_t - alpha x_hat) / sigma."""
  alpha, sigma = alpha_sigma(logsnr)
  return (z_t - bcast(alpha, z_t) * x) / bcast(sigma, z_t)


def v_from_x_eps(*, x, eps, logsnr):
  """v = alpha eps - sigma x."""
  alpha, sigma = alpha_sigma(logsnr)
  return bcast(alpha, x) * eps - bcast(sigma, x) * x


def x_from_v(*, z_t, v, logsnr):
  """x_hat = alpha z_t - sigma v_hat."""
  alpha, sigma = alpha_sigma(logsnr)
  return bcast(alpha, z_t) * z_t - bcast(sigma, z_t) * v


def eps_from_v(*, z_t, v, logsnr):
  """eps_hat = sigma z_t + alpha v_hat."""
  alpha, sigma = alpha_sigma(logsnr)
  return bcast(sigma, z_t) * z_t + bcast(alpha, z_t) * v


MEAN_TYPES = ('v', 'x', 'eps')


def x_from_output(*, z_t, output, logsnr, mean_type):
  """Converts a network output in parameterisation ``mean_type`` to x_hat."""
  if mean_type == 'v':
    return x_from_v(z_t=z_t, v=output, logsnr=logsnr)
  if mean_type == 'x':
    return output
  if mean_type == 'eps':
    return x_from_eps(z_t=z_t, eps=output, logsnr=logsnr)
  raise ValueError(f'mean_type={mean_type!r}: expected one of {MEAN_TYPES}')


def ddim_step(*, z_t, x_hat, logsnr_t, logsnr_s):
  """Deterministic DDIM step from t to s (either direction).

  z_s = alpha_s x_hat + sigma_s (z_t - alpha_t x_hat) / sigma_t
      = alpha_s x_hat + sigma_s eps_hat(z_t).
  With s > t (logsnr_s < logsnr_t) this is the reverse (encoding) step.
  """
  alpha_t, sigma_t = alpha_sigma(logsnr_t)
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  eps_hat = (z_t - bcast(alpha_t, z_t) * x_hat) / bcast(sigma_t, z_t)
  return bcast(alpha_s, z_t) * x_hat + bcast(sigma_s, z_t) * eps_hat


def forward_resample(*, z_k, logsnr_k, logsnr_s, noise):
  """Samples q(z_s | z_k) for s later than k (more noise) in the VP process.

  z_s = (alpha_s / alpha_k) z_k + sigma_{s|k} noise,
  sigma_{s|k}^2 = (1 - exp(lambda_s - lambda_k)) sigma_s^2.
  """
  alpha_k, _ = alpha_sigma(logsnr_k)
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  var = -jnp.expm1(logsnr_s - logsnr_k) * sigma_s**2
  return (bcast(alpha_s / alpha_k, z_k) * z_k
          + bcast(jnp.sqrt(jnp.maximum(var, 0.0)), z_k) * noise)


def distillation_target(*, z_t, z_target, logsnr_t, logsnr_target):
  """x_tilde such that ONE DDIM step from z_t lands on z_target.

  x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t).
  Undefined at sigma_t'' = 0 (the last step), where the caller uses x2 instead.
  """
  alpha_t, sigma_t = alpha_sigma(logsnr_t)
  alpha_u, sigma_u = alpha_sigma(logsnr_target)
  ratio = bcast(sigma_u / sigma_t, z_t)
  return (z_target - ratio * z_t) / (bcast(alpha_u, z_t) - ratio * bcast(alpha_t, z_t))


def guided(*, cond, uncond, w):
  """Classifier-free guidance: (1 + w) cond - w uncond (any of x / eps / v)."""
  w = bcast(w, cond)
  return (1.0 + w) * cond - w * uncond


LOSS_WEIGHTINGS = ('snr_trunc', 'snr_plus_one', 'snr', 'constant')


def loss_weight(logsnr, *, weighting):
  """Per-example weight omega(lambda) of an x-space squared error (the authors' dpm.py
  ``mean_loss_weight_type`` in brackets).

  ``snr_trunc``: max(SNR, 1)  (= max of x-MSE and eps-MSE) [snr_trunc];
  ``snr_plus_one``: SNR + 1   (= v-MSE) [v_mse];
  ``snr``: SNR                (= eps-MSE) [snr];
  ``constant``: 1             (= x-MSE) [constant].
  """
  snr = jnp.exp(logsnr)
  if weighting == 'snr_trunc':
    return jnp.maximum(snr, 1.0)
  if weighting == 'snr_plus_one':
    return snr + 1.0
  if weighting == 'snr':
    return snr
  if weighting == 'constant':
    return jnp.ones_like(snr)
  raise ValueError(f'weighting={weighting!r}: expected one of {LOSS_WEIGHTINGS}')


def weighted_x_mse(*, x_hat, x_target, logsnr, weighting):
  """Per-example omega(lambda) * mean ||x_hat - x_target||^2, shape [B]."""
  err = jnp.mean(jnp.square(x_hat - x_target), axis=tuple(range(1, x_hat.ndim)))
  return loss_weight(logsnr, weighting=weighting) * err
