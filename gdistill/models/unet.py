"""U-Net denoiser with class, log-SNR and (optionally) guidance-weight inputs.

Follows the architecture of the progressive-distillation code (a DDPM U-Net):
residual blocks with scale/shift conditioning, self-attention at chosen
resolutions, zero-initialised output layers. The class table has
``num_classes + 1`` rows; row ``num_classes`` is the null label used for the
unconditional branch of classifier-free guidance.

The optional ``w`` branch (Fourier features of the guidance weight, then an MLP
whose last layer is zero-initialised) is added to the conditioning embedding,
so a stage-1 student built from a teacher starts out equal to the conditional
teacher.

Options of the authors' code (``ddpm_w_distillation/w_unet3.py``), off by default:
``w_embedding='authors'`` (their w branch: sinusoidal features of the inverse-cosine
transform of w, two Dense layers, the last one not zero-initialised, scaled during
training by a warm-up factor the loss passes as ``w_scale``), ``attn_head_dim``
(multi-head attention, heads = channels / head_dim) and ``resblock_resample``
(down- and upsampling by residual blocks that average-pool or nearest-upsample
inside, as BigGAN and improved DDPM, instead of a strided conv / upsample + conv).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

zeros_init = nn.initializers.zeros


def sinusoidal_embedding(x, dim: int, max_period: float = 10000.0):
  """Sinusoidal features of a [B] float, shape [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  args = x.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def logsnr_to_time_input(logsnr):
  """Maps lambda in [-20, 20] to [0, 1000], as the PD code feeds the U-Net."""
  return 1000.0 * jnp.arctan(jnp.exp(-0.5 * jnp.clip(logsnr, -20.0, 20.0))) / (0.5 * jnp.pi)


# The w branch's input features (``model.w_embedding``): ``fourier``, gdistill's (sinusoidal
# features of ``w_embed_scale * w``, last Dense zero-initialised); ``authors``, the paper
# code's ``w_input_type='inv_cos'`` (sinusoidal features of 1000 arctan(exp(-w/2)) / (pi/2),
# the transform the time input gets, then two Dense layers with Flax's default
# initialisation: the warm-up, not a zero layer, makes the student start as its teacher).
W_EMBEDDINGS = ('fourier', 'authors')


def w_warmup_scale(step, warmup_steps: int):
  """The authors' w-embedding warm-up at training step ``step`` (the optimiser's update
  count, 0 at the first): min(1, step / warmup_steps), a float32 scalar; None for
  ``warmup_steps`` 0 (no warm-up: the network's ``w_scale=None``, scale 1)."""
  if not warmup_steps:
    return None
  return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / float(warmup_steps))


def add_guidance_weight(emb, w, *, use_w: bool, net: str, features: int, scale: float,
                        relative: bool, embedding: str = 'fourier', w_scale=None):
  """``emb`` [B, D] plus the w branch of a student: Fourier features of ``scale`` w, a Dense,
  swish and a zero-initialised Dense (``w_dense0``, ``w_dense1`` of the calling module: call
  it inside a compact method), so a student built from its teacher starts out equal to the
  conditional teacher. ``relative``: the branch's output minus its output at w = 0, so it adds
  nothing at w = 0. ``use_w=False``: ``emb`` unchanged, and w (and ``w_scale``) must be None.

  ``embedding='authors'``: the features are those of the time input's transform of w
  (``logsnr_to_time_input``: 1000 arctan(exp(-w/2)) / (pi/2)) and ``w_dense1`` has Flax's
  default initialisation (``scale`` unused); the same parameter names and shapes.
  ``w_scale``: a scalar or [B] factor on the branch's output (the authors' warm-up,
  ``w_warmup_scale``); None: 1, the branch's output added as it is."""
  if not use_w:
    if w is not None:
      raise ValueError(f'this {net} has use_w=False but a guidance weight w was passed')
    if w_scale is not None:
      raise ValueError(f'this {net} has use_w=False but a w-embedding scale w_scale was '
                       f'passed')
    return emb
  if w is None:
    raise ValueError(f'this {net} has use_w=True: pass the guidance weight w')
  if embedding not in W_EMBEDDINGS:
    raise ValueError(f'model.w_embedding={embedding!r}: expected one of {W_EMBEDDINGS}')
  dim = emb.shape[-1]
  dense0 = nn.Dense(dim, name='w_dense0')
  if embedding == 'fourier':
    dense1 = nn.Dense(dim, kernel_init=zeros_init, name='w_dense1')
    w_input = lambda wv: scale * wv
  else:
    dense1 = nn.Dense(dim, name='w_dense1')
    w_input = logsnr_to_time_input

  def branch(wv):
    return dense1(nn.swish(dense0(sinusoidal_embedding(w_input(wv), features))))
  wemb = branch(w)
  if relative:
    wemb = wemb - branch(jnp.zeros((1,), w.dtype))
  if w_scale is not None:
    w_scale = jnp.asarray(w_scale, wemb.dtype)
    wemb = wemb * (w_scale[:, None] if w_scale.ndim == 1 else w_scale)
  return emb + wemb


def upsample_nearest_2x(x):
  """Nearest-neighbour 2x upsampling, [B, H, W, C] -> [B, 2H, 2W, C].

  Equal to ``jax.image.resize(x, (B, 2H, 2W, C), 'nearest')``, but a broadcast
  and a reshape: XLA lowers resize to a gather, whose gradient is a scatter,
  both slow on CPU; the gradient of a broadcast is a reduction.
  """
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


def avg_pool_2x(x):
  """2x2 average pooling with stride 2, [B, H, W, C] -> [B, H/2, W/2, C] (even H, W):
  ``nn.avg_pool(x, (2, 2), (2, 2))`` as a reshape and a mean."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4), dtype=jnp.float32).astype(x.dtype)


def _groups(channels: int) -> int:
  return math.gcd(32, channels)


class GroupNorm(nn.Module):
  """Group normalisation over [B, ..., C], optionally followed by FiLM.

  ``nn.GroupNorm``'s parameters (``scale``, ``bias``: [C]), epsilon and
  result (float32 variance from E[x^2] - E[x]^2, its ``use_fast_variance``),
  computed for speed: one pass takes per-channel sums of x and x^2 over the
  spatial axes ([B, C], the channel axis stays contiguous and vectorised),
  the groups are combined on those small arrays, and normalisation, the
  affine parameters and FiLM ``(1 + film_scale) * h + film_shift`` fold into
  one per-(image, channel) multiply-add. Flax's version reduces over a
  [B, H, W, G, C/G] view, whose short inner axis (3 channels per group at 96
  channels) is slow on CPU, and applies the affine and FiLM as separate
  elementwise passes.

  The result has the input's dtype: under bfloat16 compute the statistics
  and the multiply-add run in float32 inside one fusion, and what leaves the
  norm (and is kept for the backward pass) is bfloat16, not a float32 copy
  of the activation.
  """
  num_groups: int
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x, film_scale=None, film_shift=None):
    B, C = x.shape[0], x.shape[-1]
    G = self.num_groups
    gamma = self.param('scale', nn.initializers.ones, (C,))
    beta = self.param('bias', nn.initializers.zeros, (C,))
    axes = tuple(range(1, x.ndim - 1))
    xf = x.astype(jnp.float32)
    count = math.prod(x.shape[1:-1]) * (C // G)
    s1 = jnp.sum(xf, axes).reshape(B, G, C // G).sum(-1) / count  # [B, G]
    s2 = jnp.sum(xf * xf, axes).reshape(B, G, C // G).sum(-1) / count
    inv = jax.lax.rsqrt(jnp.maximum(s2 - s1 * s1, 0.0) + self.epsilon)
    mul = jnp.repeat(inv, C // G, axis=-1) * gamma  # [B, C]
    add = beta - jnp.repeat(s1, C // G, axis=-1) * mul
    if film_scale is not None:
      film_scale = film_scale.reshape(B, C).astype(jnp.float32)
      mul, add = mul * (1.0 + film_scale), add * (1.0 + film_scale) + film_shift.reshape(B, C)
    bshape = (B,) + (1,) * (x.ndim - 2) + (C,)
    return (xf * mul.reshape(bshape) + add.reshape(bshape)).astype(x.dtype)


class Dropout(nn.Module):
  """``nn.Dropout`` (the 'dropout' rng stream, inputs / keep_prob where kept),
  with the mask drawn by JAX's Threefry-4x32 generator. JAX lowers its default
  Threefry-2x32 on CPU as a rolled loop that passes over the whole mask
  several times: 23 ms against 7 ms for a 32x28x28x64 mask on one core of
  the development CPU, where Flax's dropout was ~7% of a Fashion-MNIST
  teacher step. The Threefry-4x32 key is four words drawn from the stream's
  key."""
  rate: float

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    words = jax.random.bits(self.make_rng('dropout'), (4,), jnp.uint32)
    key = jax.random.wrap_key_data(words, impl='threefry4x32')
    keep_prob = 1.0 - self.rate
    keep = jax.random.bernoulli(key, keep_prob, x.shape)
    return jax.lax.select(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


class ResnetBlock(nn.Module):
  """GroupNorm-swish-conv x2 with FiLM (scale, shift) from the embedding.

  ``resample`` ('down' or 'up'; None: neither): after the first norm and swish, the
  branch and the shortcut are both 2x average-pooled or nearest-upsampled (the authors'
  ``resblock_resample``, as in BigGAN and improved DDPM)."""
  out_ch: int
  dropout: float
  dtype: Any = jnp.float32
  resample: Optional[str] = None

  @nn.compact
  def __call__(self, x, emb, train: bool):
    """``train`` is positional so that ``nn.remat`` can hold it static (argnum 3)."""
    B, H, W, C = x.shape  # [B, H, W, C]
    h = nn.swish(GroupNorm(_groups(C), name='norm1')(x))
    if self.resample is not None:
      updown = {'down': avg_pool_2x, 'up': upsample_nearest_2x}[self.resample]
      h, x = updown(h), updown(x)
      H, W = x.shape[1], x.shape[2]
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, name='conv1')(h)
    scale_shift = nn.Dense(2 * self.out_ch, dtype=self.dtype, name='temb_proj')(nn.swish(emb))
    scale, shift = jnp.split(scale_shift, 2, axis=-1)
    h = nn.swish(GroupNorm(_groups(self.out_ch), name='norm2')(h, scale, shift))
    h = Dropout(self.dropout)(h, deterministic=not train)
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, kernel_init=zeros_init, name='conv2')(h)
    if C != self.out_ch:
      x = nn.Dense(self.out_ch, dtype=self.dtype, name='nin_shortcut')(x)
    assert x.shape == h.shape == (B, H, W, self.out_ch), (x.shape, h.shape)
    return x + h


class AttnBlock(nn.Module):
  """Spatial self-attention with a zero-initialised projection: single-head, or with
  ``head_dim`` > 0 multi-head with C / head_dim heads of head_dim channels (the
  authors' ``head_dim=64``). The same parameters either way (``qkv``: C -> 3C, split
  into heads; ``proj_out``: C -> C); with head_dim = C the same function."""
  dtype: Any = jnp.float32
  head_dim: int = 0

  @nn.compact
  def __call__(self, x):
    B, H, W, C = x.shape
    h = GroupNorm(_groups(C), name='norm')(x)
    qkv = nn.Dense(3 * C, dtype=self.dtype, name='qkv')(h).reshape(B, H * W, 3, C)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.head_dim:
      if C % self.head_dim:
        raise ValueError(f'model.attn_head_dim={self.head_dim}: expected a divisor of the '
                         f'channels ({C}) of attention block {self.name}')
      heads = C // self.head_dim
      q, k, v = (a.reshape(B, H * W, heads, self.head_dim) for a in (q, k, v))
      # Softmax in float32 (XLA's implementation on CPU; cuDNN's fused one where it fits).
      h = jax.nn.dot_product_attention(q, k, v).reshape(B, H, W, C)
    else:
      logits = jnp.einsum('bqc,bkc->bqk', q, k) / math.sqrt(C)
      attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
      h = jnp.einsum('bqk,bkc->bqc', attn, v).reshape(B, H, W, C)
    return x + nn.Dense(C, dtype=self.dtype, kernel_init=zeros_init, name='proj_out')(h)


class UNet(nn.Module):
  """Class-conditional U-Net; output in the configured parameterisation.

  Attributes:
    num_classes: K; labels take values in {0..K}, K is the null label.
    out_ch: image channels.
    ch: base channel count; level i has ``ch * ch_mult[i]`` channels.
    ch_mult: channel multiplier per resolution level.
    num_res_blocks: residual blocks per level.
    attn_resolutions: spatial sizes (height) at which attention is applied.
    dropout: dropout rate inside residual blocks.
    use_w: add the guidance-weight input branch (stage-1/2 students).
    w_embed_scale: w is multiplied by this before its Fourier features.
    w_relative: the w branch's output minus its output at w = 0, so that at w = 0 a
      stage-1 student initialised from its teacher computes exactly the teacher's
      conditional output (the guided target at w = 0) and keeps doing so until its shared
      weights move; without it the branch adds a learnt offset at w = 0 too.
    w_embedding: the w branch's features, ``'fourier'`` (gdistill's) or ``'authors'``
      (``add_guidance_weight``).
    attn_head_dim: 0, single-head attention; else the channels per head of every
      attention block (which must divide their channels).
    resblock_resample: down- and upsample with residual blocks (``ResnetBlock.resample``,
      parameters ``down_{i}_downsample/conv1/...``) instead of a strided conv and a
      nearest upsample + conv (``down_{i}_downsample/kernel``).
    dtype: compute dtype (parameters stay float32).
    remat: recompute each residual and attention block's activations in the
      backward pass (``nn.remat``) instead of keeping them: the backward pass
      keeps only block inputs, for about one more forward pass of compute.
      Parameters, their names and the results are the same either way.
  """
  num_classes: int
  out_ch: int
  ch: int = 64
  ch_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (7,)
  dropout: float = 0.1
  use_w: bool = False
  w_embed_scale: float = 250.0
  w_relative: bool = False
  w_embedding: str = 'fourier'
  attn_head_dim: int = 0
  resblock_resample: bool = False
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, z, logsnr, label, w: Optional[jax.Array] = None, *, train: bool = False,
               w_scale=None):
    """z: [B, H, W, C]; logsnr: [B]; label: [B] int; w: [B] or None -> [B, H, W, C].
    ``w_scale``: scalar or [B] factor on the w branch (the w warm-up); None: 1."""
    B, H, W, C = z.shape
    assert logsnr.shape == (B,) and label.shape == (B,), (logsnr.shape, label.shape)
    temb_dim = 4 * self.ch
    emb = sinusoidal_embedding(logsnr_to_time_input(logsnr), self.ch)
    emb = nn.Dense(temb_dim, name='temb_dense0')(emb)
    emb = nn.Dense(temb_dim, name='temb_dense1')(nn.swish(emb))
    emb = emb + nn.Embed(self.num_classes + 1, temb_dim, name='class_embed')(label)
    emb = add_guidance_weight(emb, w, use_w=self.use_w, net='U-Net', features=self.ch,
                              scale=self.w_embed_scale, relative=self.w_relative,
                              embedding=self.w_embedding, w_scale=w_scale)
    emb = emb.astype(self.dtype)

    # The lifted classes keep the module names (every block is named), so
    # checkpoints load either way; the dropout rng is lifted with them.
    resnet_cls = nn.remat(ResnetBlock, static_argnums=(3,)) if self.remat else ResnetBlock
    attn_cls = nn.remat(AttnBlock) if self.remat else AttnBlock
    block = functools.partial(resnet_cls, dropout=self.dropout, dtype=self.dtype)
    attn = functools.partial(attn_cls, dtype=self.dtype, head_dim=self.attn_head_dim)
    h = nn.Conv(self.ch, (3, 3), dtype=self.dtype, name='conv_in')(z.astype(self.dtype))
    hs = [h]
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = block(self.ch * mult, name=f'down_{level}_block_{i}')(h, emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn(name=f'down_{level}_attn_{i}')(h)
        hs.append(h)
      if level != len(self.ch_mult) - 1:
        name = f'down_{level}_downsample'
        if self.resblock_resample:
          h = block(h.shape[-1], resample='down', name=name)(h, emb, train)
        else:
          h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype, name=name)(h)
        hs.append(h)

    h = block(h.shape[-1], name='mid_block_0')(h, emb, train)
    h = attn(name='mid_attn')(h)
    h = block(h.shape[-1], name='mid_block_1')(h, emb, train)

    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h = block(self.ch * mult, name=f'up_{level}_block_{i}')(h, emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn(name=f'up_{level}_attn_{i}')(h)
      if level != 0:
        name = f'up_{level}_upsample'
        if self.resblock_resample:
          h = block(h.shape[-1], resample='up', name=name)(h, emb, train)
        else:
          h = upsample_nearest_2x(h)
          h = nn.Conv(h.shape[-1], (3, 3), dtype=self.dtype, name=name)(h)
    assert not hs

    h = nn.swish(GroupNorm(_groups(h.shape[-1]), name='norm_out')(h))
    out = nn.Conv(self.out_ch, (3, 3), kernel_init=zeros_init, dtype=self.dtype, name='conv_out')(h)
    assert out.shape == z.shape, (out.shape, z.shape)
    return out.astype(jnp.float32)


# Size variants. ``tiny`` is for tests; the others match the configs.
SIZES = {
    'tiny': dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0),
    'fmnist': dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,), dropout=0.1),
    'cifar10': dict(ch=256, ch_mult=(1, 1, 1), num_res_blocks=3, attn_resolutions=(16, 8), dropout=0.2),
    'imagenet64': dict(ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3, attn_resolutions=(32, 16, 8),
                       dropout=0.1),
}
UNetTiny = functools.partial(UNet, **SIZES['tiny'])
UNetFashionMnist = functools.partial(UNet, **SIZES['fmnist'])
UNetCifar10 = functools.partial(UNet, **SIZES['cifar10'])
UNetImageNet64 = functools.partial(UNet, **SIZES['imagenet64'])


def build_unet(*, size: str, num_classes: int, out_ch: int, use_w: bool = False,
               dtype=jnp.float32, **overrides) -> UNet:
  """Returns the U-Net of a named size with keyword overrides."""
  if size not in SIZES:
    raise ValueError(f'model.size={size!r}: expected one of {sorted(SIZES)}')
  kwargs = dict(SIZES[size], **overrides)
  kwargs['ch_mult'] = tuple(kwargs['ch_mult'])
  kwargs['attn_resolutions'] = tuple(kwargs['attn_resolutions'])
  return UNet(num_classes=num_classes, out_ch=out_ch, use_w=use_w, dtype=dtype, **kwargs)
