"""Turns network parameters into ``denoise_fn(z_t, t) -> x_hat`` functions.

Samplers and losses only ever see these denoise functions. Classifier-free
guidance lives here, once: the conditional and unconditional branches are
batched into one network call and combined as
x_hat^w = (1 + w) x_hat(z_t, c) - w x_hat(z_t, null).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax.numpy as jnp

from gdistill import diffusion

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def model_x_hat(*, apply_fn, params, z_t, logsnr, label, w=None, mean_type: str,
                train: bool = False, rngs: Optional[dict] = None):
  """x_hat of one network call; shapes z_t [B, H, W, C], logsnr/label/w [B]."""
  kwargs = {} if w is None else {'w': w}
  out = apply_fn({'params': params}, z_t, logsnr, label, train=train, rngs=rngs, **kwargs)
  return diffusion.x_from_output(z_t=z_t, output=out, logsnr=logsnr, mean_type=mean_type)


def guided_x_hat(*, apply_fn, params, z_t, logsnr, label, w, num_classes: int, mean_type: str):
  """Guided teacher prediction with both branches in one batched call.

  Returns x_hat^w(z_t, c) = (1 + w) x_hat(z_t, c) - w x_hat(z_t, null), [B, H, W, C].
  """
  null = jnp.full_like(label, num_classes)
  x_both = model_x_hat(
      apply_fn=apply_fn, params=params,
      z_t=jnp.concatenate([z_t, z_t]), logsnr=jnp.concatenate([logsnr, logsnr]),
      label=jnp.concatenate([label, null]), mean_type=mean_type)
  x_cond, x_uncond = jnp.split(x_both, 2)
  return diffusion.guided(cond=x_cond, uncond=x_uncond, w=w)


def _logsnr_for(t, batch):
  return jnp.broadcast_to(diffusion.logsnr_schedule_cosine(t), (batch,))


def guided_teacher_denoise_fn(*, apply_fn, params, label, w, num_classes: int,
                              mean_type: str) -> DenoiseFn:
  """denoise_fn of the guided teacher (2 network evaluations per call)."""
  w = jnp.asarray(w, jnp.float32)

  def denoise_fn(z_t, t):
    b = z_t.shape[0]
    return guided_x_hat(apply_fn=apply_fn, params=params, z_t=z_t, logsnr=_logsnr_for(t, b),
                        label=label, w=jnp.broadcast_to(w, (b,)), num_classes=num_classes,
                        mean_type=mean_type)
  return denoise_fn


def conditional_denoise_fn(*, apply_fn, params, label, mean_type: str,
                           w: Optional[Any] = None) -> DenoiseFn:
  """denoise_fn of one network call per step (a student, or an unguided teacher).

  Pass ``w`` for a w-conditioned student; leave it None for a network without w input.
  """
  def denoise_fn(z_t, t):
    b = z_t.shape[0]
    wb = None if w is None else jnp.broadcast_to(jnp.asarray(w, jnp.float32), (b,))
    return model_x_hat(apply_fn=apply_fn, params=params, z_t=z_t, logsnr=_logsnr_for(t, b),
                       label=label, w=wb, mean_type=mean_type)
  return denoise_fn
