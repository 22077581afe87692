"""A small class-conditional DiT (Flax linen) + DDPM schedule helpers.

Written in the style of kvfrans/jax-diffusion-transformer (a JAX port of
facebookresearch/DiT), but self-contained and with THIS codebase's conventions:

* x is NCHW: [B, 1, 28, 28], pixels in [-1, 1];
* t is the integer DDPM timestep index in {0, ..., 999} (T = 1000,
  linear betas 1e-4 .. 0.02);
* the output is the eps prediction, same shape/layout as x;
* y is the class label with the NULL label = 0 and real classes 1..num_classes
  (dataset label + 1). During training labels are replaced by 0 with
  probability `class_dropout_prob`; `force_drop_ids` (1 = drop) forces it.

This file does not import gdistill: it stands for "somebody else's code".
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NUM_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02
NULL_LABEL = 0


# --------------------------------------------------------------------------- #
# DDPM schedule                                                                #
# --------------------------------------------------------------------------- #
def get_betas(num_timesteps=NUM_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END):
    """Linear beta schedule, float64 numpy, shape [T]."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def get_alphas_cumprod(num_timesteps=NUM_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END):
    """alphas_cumprod[t] = prod_{s<=t} (1 - betas[s]), float64 numpy, shape [T]."""
    return np.cumprod(1.0 - get_betas(num_timesteps, beta_start, beta_end))


def q_sample(x0, t, eps, alphas_cumprod):
    """x_t = sqrt(acp[t]) x0 + sqrt(1 - acp[t]) eps  (x0, eps: NCHW; t: int [B])."""
    a = jnp.asarray(alphas_cumprod, jnp.float32)[t][:, None, None, None]
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps


# --------------------------------------------------------------------------- #
# Embedders                                                                    #
# --------------------------------------------------------------------------- #
class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the INTEGER timestep followed by a 2-layer MLP."""
    hidden_size: int
    frequency_embedding_size: int = 256

    @nn.compact
    def __call__(self, t):
        x = self.timestep_embedding(t)
        x = nn.Dense(self.hidden_size, kernel_init=nn.initializers.normal(0.02))(x)
        x = nn.silu(x)
        x = nn.Dense(self.hidden_size, kernel_init=nn.initializers.normal(0.02))(x)
        return x

    def timestep_embedding(self, t, max_period=10000):
        t = jnp.asarray(t, jnp.float32)
        half = self.frequency_embedding_size // 2
        freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
        args = t[:, None] * freqs[None]
        return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class LabelEmbedder(nn.Module):
    """Class embedding table with the null row at index 0 (real classes 1..num_classes)."""
    dropout_prob: float
    num_classes: int
    hidden_size: int

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            rng = self.make_rng('label_dropout')
            drop_ids = jax.random.bernoulli(rng, self.dropout_prob, (labels.shape[0],))
        else:
            drop_ids = force_drop_ids == 1
        return jnp.where(drop_ids, NULL_LABEL, labels)

    @nn.compact
    def __call__(self, labels, train, force_drop_ids=None):
        table = nn.Embed(self.num_classes + 1, self.hidden_size,
                         embedding_init=nn.initializers.normal(0.02))
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return table(labels)


# --------------------------------------------------------------------------- #
# Transformer pieces                                                           #
# --------------------------------------------------------------------------- #
class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x = nn.Dense(self.mlp_dim, kernel_init=nn.initializers.xavier_uniform(),
                     bias_init=nn.initializers.normal(1e-6))(x)
        x = nn.gelu(x)
        return nn.Dense(d, kernel_init=nn.initializers.xavier_uniform(),
                        bias_init=nn.initializers.normal(1e-6))(x)


class PatchEmbed(nn.Module):
    """NHWC image -> [B, num_patches, embed_dim] tokens."""
    patch_size: int
    embed_dim: int

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), (p, p), padding='VALID',
                    kernel_init=nn.initializers.xavier_uniform())(x)
        B, h, w, D = x.shape
        return x.reshape(B, h * w, D)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def _sincos_1d(embed_dim, pos):
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(rng, embed_dim, length):
    """Fixed 2D sin-cos position embedding, [1, length, embed_dim] (stored as a param)."""
    del rng
    g = int(round(length ** 0.5))
    assert g * g == length
    gw, gh = np.meshgrid(np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64))
    emb = np.concatenate([_sincos_1d(embed_dim // 2, gw), _sincos_1d(embed_dim // 2, gh)], axis=1)
    return jnp.asarray(emb[None], jnp.float32)


class DiTBlock(nn.Module):
    """DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0

    @nn.compact
    def __call__(self, x, c):
        c = nn.Dense(6 * self.hidden_size, kernel_init=nn.initializers.zeros)(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(c, 6, axis=-1)
        h = modulate(nn.LayerNorm(use_bias=False, use_scale=False)(x), shift_msa, scale_msa)
        h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads,
                                            kernel_init=nn.initializers.xavier_uniform())(h, h)
        x = x + gate_msa[:, None] * h
        h = modulate(nn.LayerNorm(use_bias=False, use_scale=False)(x), shift_mlp, scale_mlp)
        h = MlpBlock(int(self.hidden_size * self.mlp_ratio))(h)
        return x + gate_mlp[:, None] * h


class FinalLayer(nn.Module):
    patch_size: int
    out_channels: int
    hidden_size: int

    @nn.compact
    def __call__(self, x, c):
        c = nn.Dense(2 * self.hidden_size, kernel_init=nn.initializers.zeros)(nn.silu(c))
        shift, scale = jnp.split(c, 2, axis=-1)
        x = modulate(nn.LayerNorm(use_bias=False, use_scale=False)(x), shift, scale)
        return nn.Dense(self.patch_size * self.patch_size * self.out_channels,
                        kernel_init=nn.initializers.zeros)(x)


class DiT(nn.Module):
    """Diffusion Transformer. __call__(x[B,C,H,W], t[B] int, y[B] int) -> eps[B,C,H,W]."""
    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float
    class_dropout_prob: float
    num_classes: int

    @nn.compact
    def __call__(self, x, t, y, train=False, force_drop_ids=None):
        B, C, H, W = x.shape
        p = self.patch_size
        hp, wp = H // p, W // p
        x = jnp.transpose(x, (0, 2, 3, 1))  # NCHW -> NHWC (internal)
        pos_embed = self.param('pos_embed', get_2d_sincos_pos_embed, self.hidden_size, hp * wp)
        pos_embed = jax.lax.stop_gradient(pos_embed)
        x = PatchEmbed(p, self.hidden_size)(x) + pos_embed
        t = TimestepEmbedder(self.hidden_size)(t)
        y = LabelEmbedder(self.class_dropout_prob, self.num_classes, self.hidden_size)(
            y, train=train, force_drop_ids=force_drop_ids)
        c = t + y
        for _ in range(self.depth):
            x = DiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio)(x, c)
        x = FinalLayer(p, C, self.hidden_size)(x, c)  # [B, hp*wp, p*p*C]
        x = x.reshape(B, hp, wp, p, p, C)
        x = jnp.einsum('bhwpqc->bchpwq', x).reshape(B, C, H, W)  # back to NCHW
        return x
