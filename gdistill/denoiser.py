"""The denoiser protocol: what gdistill needs to know of a network to distil it.

A ``Denoiser`` is a pure apply function plus the conventions it was trained with:

  apply_fn(params, z, time, cond, *, train, rngs[, w]) -> output

  * ``output``: what it predicts: ``eps``, ``x``, ``v`` (alpha eps - sigma x), ``flow``
    (the velocity eps - x of rectified flow; SD3, Flux), ``flow_to_data`` (x - eps;
    kvfrans/jax-flow) or ``edm`` (F of D = c_skip z + c_out F(c_in z, c_noise));
  * ``path``: its noise path and time input (``gdistill.noise_paths``);
  * ``null_cond``: the condition of the unconditional branch, one example's worth
    (a label such as K or 0, or an empty-prompt embedding [L, D]); the batch's
    condition ``cond`` is any pytree with a leading batch axis;
  * ``clip_x``: whether the samplers may clip x_hat to [-1, 1] (pixels: yes; latents: no);
  * ``layout``: ``NHWC`` or ``NCHW`` (gdistill's own arrays are NHWC);
  * ``takes_w``: whether apply_fn takes the guidance weight ``w=`` [B] (a student);
  * ``label_to_cond``: gdistill's dataset label [B] (0..K-1) -> the network's condition
    (e.g. ``label + 1`` where 0 is the null label, or an embedding table lookup); None:
    the label itself.

Guidance, the losses, the samplers and the encoder only ever see
``x_hat(params, z_vp, t, logsnr, cond)`` on the VP core; gdistill's U-Net is one
implementation (``for_gdistill_net``), not a special case.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from gdistill import diffusion, noise_paths

OUTPUTS = ('v', 'x', 'eps', 'flow', 'flow_to_data', 'edm')
LAYOUTS = ('NHWC', 'NCHW')
GUIDED_CLIPS = ('guided', 'branches')


class OutputShapeError(ValueError):
  """A network's output does not have its input's shape."""


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """A network and its conventions; hashable (held static in jitted closures)."""
  apply_fn: Callable
  output: str = 'v'
  path: Any = noise_paths.COSINE
  null_cond: Any = None
  clip_x: bool = True
  layout: str = 'NHWC'
  takes_w: bool = False
  label_to_cond: Optional[Callable] = None
  # Where a clipping sampler clips the guided teacher: 'guided' (x_hat^w) or 'branches'
  # (the conditional and unconditional x_hat each, x_hat^w not: the authors' way).
  guided_clip: str = 'guided'

  def __post_init__(self):
    if self.output not in OUTPUTS:
      raise ValueError(f'output={self.output!r}: expected one of {OUTPUTS}')
    if self.guided_clip not in GUIDED_CLIPS:
      raise ValueError(f'guided_clip={self.guided_clip!r}: expected one of {GUIDED_CLIPS}')
    if self.layout not in LAYOUTS:
      raise ValueError(f'layout={self.layout!r}: expected one of {LAYOUTS}')
    if self.output == 'edm' and not isinstance(self.path, noise_paths.EDMPath):
      raise ValueError(f"output='edm' needs an EDM noise path (its sigma_data), got "
                       f'{self.path!r}')

  def _key(self) -> tuple:
    """What makes two denoisers the same; a null condition that is an array (unhashable)
    counts by identity."""
    try:
      null = (hash(self.null_cond), self.null_cond)
    except TypeError:
      null = id(self.null_cond)
    return (self.apply_fn, self.output, self.path, null, self.clip_x, self.layout,
            self.takes_w, self.label_to_cond, self.guided_clip)

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return self is other or (isinstance(other, Denoiser) and self._key() == other._key())

  def condition(self, label):
    """The network's condition of gdistill's labels (pytree, leading axis B)."""
    return label if self.label_to_cond is None else self.label_to_cond(label)

  def x_hat(self, params, z_t, *, t, logsnr, cond, w=None, train: bool = False,
            rngs: Optional[dict] = None, raw_cond: bool = False, w_scale=None):
    """x_hat(z_t, t, cond[, w]) on the VP core.

    Args:
      z_t: [B, H, W, C] VP-scaled noisy input, NHWC.
      t: [B] times in [0, 1] (what the path turns into the network's time input).
      logsnr: [B] lambda(t) of ``self.path`` (the caller has it already).
      cond: gdistill's labels [B] (or any pytree with leading axis B), mapped by
        ``label_to_cond``; with ``raw_cond`` already the network's condition.
      w: [B] guidance weight, for a network that ``takes_w``.
      w_scale: a factor on the network's w branch (the authors' warm-up; gdistill's
        networks), None for none.
    Returns:
      x_hat [B, H, W, C] float32.
    """
    scale = self.path.native_scale(logsnr)
    z = z_t if scale is None else diffusion.bcast(scale, z_t) * z_t
    z_in = z
    if self.output == 'edm':
      sigma, sd = noise_paths.EDMPath.sigma(logsnr), self.path.sigma_data
      z_in = diffusion.bcast(jax.lax.rsqrt(jnp.square(sigma) + sd * sd), z) * z
    if self.layout == 'NCHW':
      z_in = jnp.transpose(z_in, (0, 3, 1, 2))
    kwargs = {} if w is None else {'w': w}
    if w_scale is not None:
      kwargs['w_scale'] = w_scale
    cond = cond if raw_cond else self.condition(cond)
    out = self.apply_fn(params, z_in, self.path.time_input(t, logsnr), cond, train=train,
                        rngs=rngs, **kwargs)
    if self.layout == 'NCHW':
      out = jnp.transpose(out, (0, 2, 3, 1))
    if out.shape != z_t.shape:  # at trace time: costs nothing per call
      raise OutputShapeError(f'the network returns shape {tuple(out.shape)} for inputs '
                             f'{tuple(z_t.shape)} (NHWC; layout {self.layout}); expected the '
                             f'input shape')
    return self._to_x(out, z_vp=z_t, z=z, logsnr=logsnr)

  def _to_x(self, out, *, z_vp, z, logsnr):
    if self.output in ('v', 'x', 'eps'):
      return diffusion.x_from_output(z_t=z_vp, output=out, logsnr=logsnr, mean_type=self.output)
    if self.output in ('flow', 'flow_to_data'):
      s = diffusion.bcast(noise_paths.FlowPath.noise_fraction(logsnr), z)
      return z - s * out if self.output == 'flow' else z + s * out
    sigma, sd = diffusion.bcast(noise_paths.EDMPath.sigma(logsnr), z), self.path.sigma_data
    denom = jnp.square(sigma) + sd * sd
    return sd * sd / denom * z + sigma * sd * jax.lax.rsqrt(denom) * out

  def null_like(self, cond):
    """The null condition broadcast to ``cond``'s batch (``cond`` in network space)."""
    return jax.tree.map(
        lambda c, n: jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape), cond, self.null_cond)

  def guided_x_hat(self, params, z_t, *, t, logsnr, cond, w, clip_branches: bool = False):
    """x_hat^w = (1 + w) x_hat(z_t, c) - w x_hat(z_t, null), both branches in one call;
    ``clip_branches``: each branch clipped to [-1, 1] first (``sampler_clips``)."""
    cond = self.condition(cond)
    both = jax.tree.map(lambda c, n: jnp.concatenate([c, n]), cond, self.null_like(cond))
    x_both = self.x_hat(params, jnp.concatenate([z_t, z_t]), t=jnp.concatenate([t, t]),
                        logsnr=jnp.concatenate([logsnr, logsnr]), cond=both, raw_cond=True)
    if clip_branches:
      x_both = jnp.clip(x_both, -1.0, 1.0)
    x_cond, x_uncond = jnp.split(x_both, 2)
    return diffusion.guided(cond=x_cond, uncond=x_uncond, w=w)

  def clips_branches(self, mode: str) -> bool:
    """Whether a sampler of ``mode`` clips the guided teacher's branches (not x_hat^w)."""
    return self.clip_x and mode == 'guided' and self.guided_clip == 'branches'

  def sampler_clips(self, mode: str) -> bool:
    """Whether a sampler of ``mode`` (guided, student, conditional) clips its x_hat."""
    return self.clip_x and not self.clips_branches(mode)

  def describe(self) -> dict:
    """Its conventions as JSON (checkpoint meta, the teacher file's sidecar)."""
    d = {'output': self.output, 'path': self.path.describe(), 'clip_x': self.clip_x,
         'layout': self.layout}
    if self.guided_clip != 'guided':  # only where set: earlier metas stay equal
      d['guided_clip'] = self.guided_clip
    return d


@dataclasses.dataclass(frozen=True)
class _NetApply:
  """gdistill's networks take ``{'params': params}``, the protocol passes ``params``; a
  value, equal for equal modules, so two denoisers of one network compare equal."""
  module_apply: Callable

  def __call__(self, params, z, time, cond, **kwargs):
    return self.module_apply({'params': params}, z, time, cond, **kwargs)


def from_apply(module_apply, *, mean_type: str, num_classes: int, takes_w: bool = False,
               path=noise_paths.COSINE, clip_x: bool = True) -> Denoiser:
  """A network called as gdistill's are, ``module_apply({'params': p}, z, time, label,
  *, train, rngs[, w])``: NHWC, a label condition, the null label K."""
  return Denoiser(apply_fn=_NetApply(module_apply), output=mean_type, path=path,
                  null_cond=int(num_classes), clip_x=clip_x, layout='NHWC', takes_w=takes_w)


def for_gdistill_net(net, *, mean_type: str, num_classes: int, path=noise_paths.COSINE,
                     clip_x: bool = True) -> Denoiser:
  """gdistill's own network (U-Net or DiT) as a denoiser."""
  return from_apply(net.apply, mean_type=mean_type, num_classes=num_classes,
                    takes_w=bool(getattr(net, 'use_w', False)), path=path, clip_x=clip_x)
