"""Diffusion Transformer (DiT, Peebles & Xie 2023) with the U-Net's inputs and outputs.

Same call and conditioning as ``models/unet.py``'s U-Net, so samplers, losses and the
distillation stages treat the two alike: ``net(z, logsnr, label, w=None, *, train)``
maps z [B, H, W, C] to [B, H, W, C] float32 in the configured parameterisation. The
conditioning vector is the U-Net's: sinusoidal features of the log-SNR's time input
through two Dense layers, plus a class embedding of ``num_classes + 1`` rows (row
``num_classes`` is the null label of classifier-free guidance), plus (``use_w``) the
guidance weight's branch whose last layer is zero-initialised.

The network: a ``patch_size`` x ``patch_size`` patch embedding (a strided conv) plus a
fixed 2-D sin-cos position embedding; ``depth`` transformer blocks with adaLN-zero
conditioning (LayerNorm without affine parameters, then ``(1 + scale) * h + shift``
from the conditioning vector, each residual branch multiplied by a gate; the
modulation Dense is zero-initialised, so every block starts as the identity); a final
adaLN and a zero-initialised linear layer to ``patch_size**2 * out_ch`` values per
token, unpatchified. A fresh DiT therefore predicts exactly 0, as a fresh U-Net does.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gdistill.models.unet import (Dropout, add_guidance_weight, logsnr_to_time_input,
                                  sinusoidal_embedding)

zeros_init = nn.initializers.zeros
# DiT's initialisers: Xavier-uniform linear layers, N(0, 0.02) embeddings and time MLP.
xavier = nn.initializers.xavier_uniform()
small_normal = nn.initializers.normal(0.02)
# Sinusoidal features of the time input and of w (DiT's frequency_embedding_size).
FREQ_DIM = 256


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding (MAE / DiT), shape [h * w, dim].

  The first ``dim / 2`` features encode the row, the rest the column, each as
  ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_i = 10000^(-i / (dim / 4))``.
  A numpy constant: folded into the program, not a parameter.
  """
  if dim % 4:
    raise ValueError(f'hidden_size={dim}: expected a multiple of 4 (2-D sin-cos position '
                     f'embedding)')

  def one_axis(d, pos):  # [N] -> [N, d]
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                           indexing='ij')
  return np.concatenate([one_axis(dim // 2, rows), one_axis(dim // 2, cols)],
                        axis=1).astype(np.float32)


def modulate(x, shift, scale):
  """adaLN: x [B, T, D], shift and scale [B, D] -> (1 + scale) * x + shift."""
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class Attention(nn.Module):
  """Multi-head self-attention over tokens [B, T, D]; softmax in float32."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    B, T, D = x.shape
    hd = D // self.num_heads
    qkv = nn.Dense(3 * D, dtype=self.dtype, kernel_init=xavier, name='qkv')(x)
    q, k, v = jnp.split(qkv.reshape(B, T, 3, self.num_heads, hd), 3, axis=2)
    # [B, T, N, hd] each; XLA's implementation on CPU, cuDNN's fused one where it fits.
    h = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
    return nn.Dense(D, dtype=self.dtype, kernel_init=xavier, name='proj')(h.reshape(B, T, D))


class DiTBlock(nn.Module):
  """adaLN-zero transformer block: x + gate * f(modulate(LN(x), shift, scale)) for f in
  (attention, MLP); the six modulation vectors come from one zero-initialised Dense."""
  num_heads: int
  mlp_ratio: float
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, c, train: bool):
    """x: [B, T, D]; c: [B, D] -> [B, T, D]. ``train`` positional for ``nn.remat``
    (static argnum 3)."""
    B, T, D = x.shape
    mod = nn.Dense(6 * D, dtype=self.dtype, kernel_init=zeros_init, name='adaln')(nn.swish(c))
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, use_bias=False, use_scale=False,
                             dtype=self.dtype)
    h = Attention(self.num_heads, dtype=self.dtype, name='attn')(
        modulate(norm(name='norm1')(x), shift_a, scale_a))
    x = x + gate_a[:, None, :] * h
    h = modulate(norm(name='norm2')(x), shift_m, scale_m)
    h = nn.Dense(int(D * self.mlp_ratio), dtype=self.dtype, kernel_init=xavier, name='mlp_in')(h)
    h = Dropout(self.dropout)(nn.gelu(h, approximate=True), deterministic=not train)
    h = nn.Dense(D, dtype=self.dtype, kernel_init=xavier, name='mlp_out')(h)
    out = x + gate_m[:, None, :] * h
    assert out.shape == (B, T, D), out.shape
    return out


class DiT(nn.Module):
  """Class-conditional DiT; output in the configured parameterisation.

  Attributes:
    num_classes: K; labels take values in {0..K}, K is the null label.
    out_ch: image channels.
    patch_size: side of the square patches; must divide the image's height and width.
    hidden_size: token width D (a multiple of 4 and of ``num_heads``).
    depth: transformer blocks.
    num_heads: attention heads.
    mlp_ratio: MLP hidden width / D.
    dropout: dropout rate on the MLP's hidden activations ('dropout' rng stream).
    use_w, w_embed_scale, w_relative, w_embedding: the guidance-weight branch, as in the
      U-Net (``unet.add_guidance_weight``; ``w_embedding='authors'``: the authors' features,
      on ``FREQ_DIM`` sinusoids as gdistill's).
    dtype: compute dtype (parameters stay float32).
    remat: recompute each block's activations in the backward pass (``nn.remat``);
      parameters, their names and the results are the same either way.
  """
  num_classes: int
  out_ch: int
  patch_size: int = 2
  hidden_size: int = 128
  depth: int = 6
  num_heads: int = 4
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  use_w: bool = False
  w_embed_scale: float = 250.0
  w_relative: bool = False
  w_embedding: str = 'fourier'
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, z, logsnr, label, w: Optional[jax.Array] = None, *, train: bool = False,
               w_scale=None):
    """z: [B, H, W, C]; logsnr: [B]; label: [B] int; w: [B] or None -> [B, H, W, C].
    ``w_scale``: scalar or [B] factor on the w branch (the w warm-up); None: 1."""
    B, H, W, C = z.shape
    p, D = self.patch_size, self.hidden_size
    assert logsnr.shape == (B,) and label.shape == (B,), (logsnr.shape, label.shape)
    if H % p or W % p:
      raise ValueError(f'model.patch_size={p}: expected a divisor of the image size {H}x{W}')
    if D % self.num_heads:
      raise ValueError(f'model.hidden_size={D}: expected a multiple of model.num_heads='
                       f'{self.num_heads}')

    # The conditioning vector, exactly as the U-Net builds its embedding.
    c = sinusoidal_embedding(logsnr_to_time_input(logsnr), FREQ_DIM)
    c = nn.Dense(D, kernel_init=small_normal, name='temb_dense0')(c)
    c = nn.Dense(D, kernel_init=small_normal, name='temb_dense1')(nn.swish(c))
    c = c + nn.Embed(self.num_classes + 1, D, embedding_init=small_normal,
                     name='class_embed')(label)
    c = add_guidance_weight(c, w, use_w=self.use_w, net='DiT', features=FREQ_DIM,
                            scale=self.w_embed_scale, relative=self.w_relative,
                            embedding=self.w_embedding, w_scale=w_scale)
    c = c.astype(self.dtype)

    h = nn.Conv(D, (p, p), strides=(p, p), padding='VALID', kernel_init=xavier,
                dtype=self.dtype, name='patch_embed')(z.astype(self.dtype))
    gh, gw = H // p, W // p
    h = h.reshape(B, gh * gw, D) + sincos_pos_embed_2d(D, gh, gw).astype(self.dtype)

    # The lifted class keeps the module names, so checkpoints load either way.
    block_cls = nn.remat(DiTBlock, static_argnums=(3,)) if self.remat else DiTBlock
    for i in range(self.depth):
      h = block_cls(self.num_heads, self.mlp_ratio, self.dropout, dtype=self.dtype,
                    name=f'block_{i}')(h, c, train)

    shift, scale = jnp.split(nn.Dense(2 * D, dtype=self.dtype, kernel_init=zeros_init,
                                      name='final_adaln')(nn.swish(c)), 2, axis=-1)
    h = nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=self.dtype,
                     name='norm_out')(h)
    h = nn.Dense(p * p * self.out_ch, dtype=self.dtype, kernel_init=zeros_init,
                 name='final_linear')(modulate(h, shift, scale))  # [B, T, p * p * C_out]
    out = h.reshape(B, gh, gw, p, p, self.out_ch).transpose(0, 1, 3, 2, 4, 5)
    out = out.reshape(B, H, W, self.out_ch)
    assert out.shape == z.shape, (out.shape, z.shape)
    return out.astype(jnp.float32)


# Size variants. ``tiny`` is for tests; ``fmnist`` trains on a 2-core CPU; ``b2`` and
# ``xl2`` are the paper's DiT-B/2 and DiT-XL/2.
SIZES = {
    'tiny': dict(patch_size=4, hidden_size=32, depth=2, num_heads=2, mlp_ratio=4.0, dropout=0.0),
    'fmnist': dict(patch_size=2, hidden_size=128, depth=6, num_heads=4, mlp_ratio=4.0,
                   dropout=0.1),
    'b2': dict(patch_size=2, hidden_size=768, depth=12, num_heads=12, mlp_ratio=4.0, dropout=0.0),
    'xl2': dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
                dropout=0.0),
}


def build_dit(*, size: str, num_classes: int, out_ch: int, use_w: bool = False,
              dtype=jnp.float32, **overrides) -> DiT:
  """Returns the DiT of a named size with keyword overrides."""
  if size not in SIZES:
    raise ValueError(f'model.size={size!r}: expected one of {sorted(SIZES)}')
  return DiT(num_classes=num_classes, out_ch=out_ch, use_w=use_w, dtype=dtype,
             **dict(SIZES[size], **overrides))
