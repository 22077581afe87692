"""Between the data and the diffusion: images in [-1, 1] <-> the model's space.

  IDENTITY             pixels (every run before latent teachers): encode and decode return
                       their input, and the samplers clip x-hat to [-1, 1] (``clip_x``)
  AutoencoderCodec     a frozen autoencoder (``gdistill.models.autoencoder``):
                       z = (mean_encoder(x) - shift) * scale, x = decoder(z / scale + shift);
                       the samplers do not clip in latent space
  FunctionCodec        a user's own autoencoder (a ``teacher.source`` factory's ``codec``):
                       its pure encode/decode functions and parameters, e.g. Stable
                       Diffusion's VAE (README, "Bring your own teacher")

Every codec has ``params`` and the pure ``encode_with(params, x)`` / ``decode_with(params,
z)`` that jitted code calls with the parameters as an argument (so a large autoencoder is
not baked into a program as constants); ``encode`` / ``decode`` use its own ``params``.
Images are [B, H, W, C] in [-1, 1]; the model's space is [B, h, w, c] (NHWC: a teacher
with another layout transposes inside its ``Denoiser``).

An autoencoder codec is one file (``load``): its parameters written by
``gdistill.teacher_file.save_params`` (msgpack, no pickle) with a JSON sidecar whose
``codec`` entry says what it is (architecture keys, scale, shift, image and latent shapes)
and ``measured`` how well it reconstructs. ``python -m gdistill.autoencoder`` trains and
writes one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from gdistill.checkpoint import CheckpointError

AUTOENCODER = 'autoencoder'
ARCH_KEYS = ('ch', 'ch_mult', 'num_res_blocks', 'latent_ch', 'out_ch')


@dataclasses.dataclass(frozen=True)
class IdentityCodec:
  """Pixels: the model's space is the image's."""
  kind: str = 'identity'
  clip_x: bool = True
  params: Any = None
  image_shape: Optional[tuple] = None  # any

  @property
  def is_identity(self) -> bool:
    return True

  def model_shape(self, image_shape) -> tuple:
    return tuple(image_shape)

  def encode_with(self, params, x):
    del params
    return x

  def decode_with(self, params, z):
    del params
    return z

  def encode(self, x):
    return x

  def decode(self, z):
    return z

  def describe(self) -> dict:
    return {'kind': self.kind}


IDENTITY = IdentityCodec()


@dataclasses.dataclass(frozen=True, eq=False)
class AutoencoderCodec:
  """A frozen autoencoder; ``encode`` / ``decode`` are pure and jittable.

  Attributes:
    arch: the ``Autoencoder`` module's keyword arguments (``ARCH_KEYS``).
    params: its parameters.
    scale, shift: latent = (posterior mean - shift) * scale (Stable Diffusion's VAE:
      scale 0.18215, shift 0), chosen so the latents have unit variance.
    image_shape: [H, W, C] of the images it takes.
    path: the file it was loaded from ('' if built in memory).
  """
  arch: dict
  params: Any
  scale: float
  shift: float
  image_shape: tuple
  path: str = ''
  kind: str = AUTOENCODER
  clip_x: bool = False

  @functools.cached_property
  def module(self):
    from gdistill.models.autoencoder import Autoencoder  # pylint: disable=g-import-not-at-top
    return Autoencoder(**self.arch)

  @property
  def is_identity(self) -> bool:
    return False

  def model_shape(self, image_shape=None) -> tuple:
    from gdistill.models import autoencoder  # pylint: disable=g-import-not-at-top
    return autoencoder.latent_shape(image_shape or self.image_shape,
                                    ch_mult=self.arch['ch_mult'], latent_ch=self.arch['latent_ch'])

  def encode_with(self, params, x):
    mean, _ = self.module.apply({'params': params}, x, method='encode')
    return (mean - self.shift) * self.scale

  def decode_with(self, params, z):
    return self.module.apply({'params': params}, z / self.scale + self.shift, method='decode')

  def encode(self, x):
    return self.encode_with(self.params, x)

  def decode(self, z):
    return self.decode_with(self.params, z)

  def describe(self) -> dict:
    return {'kind': self.kind, 'arch': _json_arch(self.arch), 'scale': float(self.scale),
            'shift': float(self.shift), 'image_shape': list(self.image_shape),
            'latent_shape': list(self.model_shape())}


@dataclasses.dataclass(frozen=True, eq=False)
class FunctionCodec:
  """A user's frozen autoencoder as two pure functions (``teacher.source`` factories).

  Attributes:
    encode_fn: ``(params, x [B, H, W, C] in [-1, 1]) -> z [B, h, w, c]``, scaling included
      (Stable Diffusion: the posterior mean times 0.18215, transposed from NCHW).
    decode_fn: ``(params, z) -> x`` in [-1, 1] (the inverse, unclipped).
    params: their parameters.
    image_shape, latent_shape: [H, W, C] and [h, w, c].
    name: what it is, for checkpoint metas and reports (e.g. 'sd-vae-ft-mse').
    clip_x: whether the samplers may clip x-hat in its space (latents: no).
  """
  encode_fn: Any
  decode_fn: Any
  params: Any
  image_shape: tuple
  latent_shape: tuple
  name: str
  clip_x: bool = False
  kind: str = 'function'

  @property
  def is_identity(self) -> bool:
    return False

  def model_shape(self, image_shape=None) -> tuple:
    del image_shape
    return tuple(int(d) for d in self.latent_shape)

  def encode_with(self, params, x):
    return self.encode_fn(params, x)

  def decode_with(self, params, z):
    return self.decode_fn(params, z)

  def encode(self, x):
    return self.encode_fn(self.params, x)

  def decode(self, z):
    return self.decode_fn(self.params, z)

  def describe(self) -> dict:
    return {'kind': self.kind, 'name': self.name, 'image_shape': list(self.image_shape),
            'latent_shape': list(self.model_shape()), 'clip_x': bool(self.clip_x)}


def _json_arch(arch: dict) -> dict:
  return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in arch.items()}


def abstract_params(arch: dict, image_shape) -> Any:
  """The parameter tree's shapes of an autoencoder for ``image_shape`` images."""
  from gdistill.models.autoencoder import Autoencoder  # pylint: disable=g-import-not-at-top
  module = Autoencoder(**arch)
  x = jnp.zeros((1, *image_shape), jnp.float32)
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x))['params']


def save(path: str, codec: AutoencoderCodec, *, measured: Optional[dict] = None,
         extra_info: Optional[dict] = None) -> dict:
  """Writes the codec as one file with its sidecar; returns the sidecar."""
  from gdistill import teacher_file  # pylint: disable=g-import-not-at-top
  info = dict(extra_info or {}, codec=codec.describe(), measured=dict(measured or {}))
  return teacher_file.save_params(path, codec.params, info)


def load(path: str) -> AutoencoderCodec:
  """The autoencoder codec in ``path`` (CheckpointError, one line, if it is not one)."""
  from gdistill import teacher_file  # pylint: disable=g-import-not-at-top
  info = teacher_file.read_info(path)
  desc = info.get('codec')
  if not isinstance(desc, dict) or desc.get('kind') != AUTOENCODER or 'use_w' in info:
    raise CheckpointError(f'{path}: not an autoencoder file (its sidecar has no "codec" entry '
                          f'of kind "{AUTOENCODER}", or is a diffusion model\'s; expected a file '
                          f'written by python -m gdistill.autoencoder)')
  try:
    arch = {k: desc['arch'][k] for k in ARCH_KEYS}
    arch['ch_mult'] = tuple(arch['ch_mult'])
    image_shape = tuple(int(d) for d in desc['image_shape'])
    scale, shift = float(desc['scale']), float(desc['shift'])
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f'{path}: its sidecar\'s "codec" entry is incomplete ({e!r}); expected '
                          f'arch {ARCH_KEYS}, scale, shift, image_shape') from e
  params, _ = teacher_file.load_params(path, expect=None,
                                       abstract_params=abstract_params(arch, image_shape))
  return AutoencoderCodec(arch=arch, params=params, scale=scale, shift=shift,
                          image_shape=image_shape, path=path)


def from_path(path: str):
  """The codec a config names: '' is pixels (IDENTITY), else an autoencoder file."""
  return IDENTITY if not path else load(path)
