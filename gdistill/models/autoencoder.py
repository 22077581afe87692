"""A small convolutional autoencoder: images <-> latents (the codec of a latent run).

``Autoencoder(x)`` with x [B, H, W, C] in [-1, 1] gives the reconstruction and the
posterior's mean and log-variance [B, H / 2^k, W / 2^k, latent_ch] (k = len(ch_mult));
``encode`` and ``decode`` are its halves (``method=`` of ``apply``). KL-regularised as
Stable Diffusion's AutoencoderKL (Rombach et al. 2022), without its perceptual and
adversarial losses: ``kl_weight`` = 0 makes it a plain autoencoder (the posterior mean
is the latent either way). 28x28x1 -> 7x7x4 with ch_mult (1, 2).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _groups(ch: int) -> int:
  return min(8, ch)


class ResBlock(nn.Module):
  ch: int

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.ch, (3, 3))(nn.silu(nn.GroupNorm(_groups(x.shape[-1]))(x)))
    h = nn.Conv(self.ch, (3, 3))(nn.silu(nn.GroupNorm(_groups(self.ch))(h)))
    if x.shape[-1] != self.ch:
      x = nn.Conv(self.ch, (1, 1))(x)
    return x + h


class Encoder(nn.Module):
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  latent_ch: int

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.ch, (3, 3))(x)
    for mult in self.ch_mult:
      for _ in range(self.num_res_blocks):
        h = ResBlock(self.ch * mult)(h)
      h = nn.Conv(self.ch * mult, (3, 3), strides=(2, 2))(h)  # halves H and W
    h = ResBlock(self.ch * self.ch_mult[-1])(h)
    h = nn.Conv(2 * self.latent_ch, (3, 3))(nn.silu(nn.GroupNorm(_groups(h.shape[-1]))(h)))
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


class Decoder(nn.Module):
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  out_ch: int

  @nn.compact
  def __call__(self, z):
    h = nn.Conv(self.ch * self.ch_mult[-1], (3, 3))(z)
    h = ResBlock(self.ch * self.ch_mult[-1])(h)
    for mult in reversed(tuple(self.ch_mult)):
      b, height, width, c = h.shape
      h = jax.image.resize(h, (b, 2 * height, 2 * width, c), 'nearest')
      h = nn.Conv(self.ch * mult, (3, 3))(h)
      for _ in range(self.num_res_blocks):
        h = ResBlock(self.ch * mult)(h)
    return nn.Conv(self.out_ch, (3, 3))(nn.silu(nn.GroupNorm(_groups(h.shape[-1]))(h)))


class Autoencoder(nn.Module):
  """Encoder and decoder; ``__call__`` samples the posterior when given ``rng``."""
  ch: int = 32
  ch_mult: Sequence[int] = (1, 2)
  num_res_blocks: int = 1
  latent_ch: int = 4
  out_ch: int = 1

  def setup(self):
    self.encoder = Encoder(self.ch, tuple(self.ch_mult), self.num_res_blocks, self.latent_ch)
    self.decoder = Decoder(self.ch, tuple(self.ch_mult), self.num_res_blocks, self.out_ch)

  def encode(self, x):
    return self.encoder(x)

  def decode(self, z):
    return self.decoder(z)

  def __call__(self, x, rng=None):
    mean, logvar = self.encode(x)
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    return self.decode(z), mean, logvar


def latent_shape(image_shape, *, ch_mult, latent_ch) -> tuple:
  """[H, W, C] -> the latent's [H / 2^k, W / 2^k, latent_ch]; H and W must divide."""
  h, w, _ = image_shape
  k = 2 ** len(tuple(ch_mult))
  if h % k or w % k:
    raise ValueError(f'image shape {tuple(image_shape)}: height and width must be multiples of '
                     f'2^len(ch_mult) = {k}')
  return (h // k, w // k, latent_ch)
