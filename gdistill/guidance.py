"""Turns a denoiser and its parameters into ``denoise_fn(z_t, t) -> x_hat`` functions.

Samplers and losses only ever see these denoise functions. Classifier-free
guidance lives in ``Denoiser.guided_x_hat``, once: the conditional and
unconditional branches are batched into one network call and combined as
x_hat^w = (1 + w) x_hat(z_t, c) - w x_hat(z_t, null).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax.numpy as jnp

from gdistill.denoiser import Denoiser

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def _times(net: Denoiser, t, batch: int):
  """t and lambda(t) as [B]; lambda of the scalar t, broadcast (as before the protocol)."""
  return (jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,)),
          jnp.broadcast_to(net.path.logsnr(t), (batch,)))


def guided_teacher_denoise_fn(net: Denoiser, *, params, cond, w) -> DenoiseFn:
  """denoise_fn of the guided teacher (2 network evaluations per call)."""
  w = jnp.asarray(w, jnp.float32)

  def denoise_fn(z_t, t):
    b = z_t.shape[0]
    t, logsnr = _times(net, t, b)
    return net.guided_x_hat(params, z_t, t=t, logsnr=logsnr, cond=cond,
                            w=jnp.broadcast_to(w, (b,)), clip_branches=net.clips_branches('guided'))
  return denoise_fn


def conditional_denoise_fn(net: Denoiser, *, params, cond, w: Optional[Any] = None) -> DenoiseFn:
  """denoise_fn of one network call per step (a student, or an unguided teacher).

  Pass ``w`` for a w-conditioned student; leave it None for a network without w input.
  """
  def denoise_fn(z_t, t):
    b = z_t.shape[0]
    t, logsnr = _times(net, t, b)
    wb = None if w is None else jnp.broadcast_to(jnp.asarray(w, jnp.float32), (b,))
    return net.x_hat(params, z_t, t=t, logsnr=logsnr, cond=cond, w=wb)
  return denoise_fn
