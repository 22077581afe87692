"""Noise paths: how a network was trained to see noise, mapped onto gdistill's VP core.

Every Gaussian diffusion path is z = a(t) x + b(t) eps. gdistill's maths (guidance,
targets, samplers, the encoder) runs on its variance-preserving form

  z_vp = z / sqrt(a^2 + b^2),  lambda = log-SNR = 2 log(a / b),  t in [0, 1] (1 = noise),

so a path only has to say what lambda(t) is, how z_vp scales to the network's own z
(``native_scale``), and which time input the network takes (``time_input``). Paths are
frozen dataclasses: hashable, so they can sit in jitted closures and compare equal by
value.

  * ``CosinePath``: gdistill's own (truncated cosine log-SNR; its U-Net takes lambda).
  * ``DDPMPath``: a DDPM table of T timesteps from linear / scaled-linear / cosine betas,
    integer timestep input 0..T-1 (diffusers, maxdiffusion SD, DiT). Table index i is at
    t = (i + 1) / T; by default every time is rounded to the table (so a grid of N steps
    is a subset of the grid of 2N, and every query is a time the network was trained
    on); ``interpolate=True`` passes fractional timesteps instead.
  * ``FlowPath``: rectified flow z = (1 - s) x + s eps with the SD3 / Flux time shift.
  * ``EDMPath``: variance-exploding z = x + sigma eps, sigma on Karras' rho grid, the
    EDM noise input 0.25 log sigma.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from gdistill import diffusion

LOGSNR_MIN, LOGSNR_MAX = diffusion.LOGSNR_MIN, diffusion.LOGSNR_MAX


def _clip_logsnr(lam):
  return jnp.clip(lam, LOGSNR_MIN, LOGSNR_MAX)


@dataclasses.dataclass(frozen=True)
class CosinePath:
  """gdistill's truncated cosine log-SNR (``diffusion.logsnr_schedule_cosine``); the
  network's time input is lambda itself (gdistill's U-Net and DiT embed it)."""
  kind = 'cosine'
  num_timesteps = None

  def logsnr(self, t):
    return diffusion.logsnr_schedule_cosine(t)

  def time_input(self, t, logsnr):
    del t
    return logsnr

  def native_scale(self, logsnr):
    """sqrt(a^2 + b^2): None where it is 1 (a VP path), so nothing is multiplied."""
    del logsnr

  def sample_t(self, rng, batch: int):
    """Training times t ~ U[0, 1], [B]."""
    return jax.random.uniform(rng, (batch,))

  def describe(self) -> dict:
    return {'kind': self.kind}


BETA_SCHEDULES = ('linear', 'scaled_linear', 'cosine')


def ddpm_alphas_cumprod(betas: str, num_timesteps: int, beta_start: float,
                        beta_end: float) -> np.ndarray:
  """alpha_bar_i = prod_{j <= i} (1 - beta_j), i = 0..T-1, in float64 (diffusers' tables).

  ``linear``: betas evenly spaced in [beta_start, beta_end]; ``scaled_linear``: their
  square roots evenly spaced (Stable Diffusion); ``cosine``: Nichol & Dhariwal's
  alpha_bar(u) = cos^2((u + 0.008) / 1.008 pi / 2), betas capped at 0.999.
  """
  n = int(num_timesteps)
  if betas == 'linear':
    b = np.linspace(beta_start, beta_end, n, dtype=np.float64)
  elif betas == 'scaled_linear':
    b = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
  elif betas == 'cosine':
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    u = np.arange(n + 1, dtype=np.float64) / n
    b = np.minimum(1 - f(u[1:]) / f(u[:-1]), 0.999)
  else:
    raise ValueError(f'betas={betas!r}: expected one of {BETA_SCHEDULES}')
  return np.cumprod(1.0 - b)


@dataclasses.dataclass(frozen=True)
class DDPMPath:
  """A DDPM table: integer timesteps 0..T-1, z_i = sqrt(abar_i) x + sqrt(1 - abar_i) eps.

  Index i sits at t = (i + 1) / T; t = 0 is the clean data (lambda = LOGSNR_MAX).
  """
  betas: str = 'linear'
  num_timesteps: int = 1000
  beta_start: float = 1e-4
  beta_end: float = 0.02
  interpolate: bool = False
  kind = 'ddpm'

  def __post_init__(self):
    if self.betas not in BETA_SCHEDULES:
      raise ValueError(f'betas={self.betas!r}: expected one of {BETA_SCHEDULES}')
    if int(self.num_timesteps) < 2:
      raise ValueError(f'num_timesteps={self.num_timesteps}: expected at least 2')

  @property
  def table(self) -> np.ndarray:
    """lambda at t = k / T, k = 0..T (k = 0: the clean end), float64 [T + 1]."""
    abar = ddpm_alphas_cumprod(self.betas, self.num_timesteps, self.beta_start, self.beta_end)
    lam = np.log(abar) - np.log1p(-abar)
    return np.concatenate([[max(LOGSNR_MAX, lam[0])], lam])

  def _k(self, t):
    """t in units of the table: k = t T (rounded unless ``interpolate``)."""
    k = jnp.asarray(t, jnp.float32) * self.num_timesteps
    return k if self.interpolate else jnp.round(k)

  def logsnr(self, t):
    k = jnp.clip(self._k(t), 0.0, float(self.num_timesteps))
    table = jnp.asarray(self.table, jnp.float32)
    return _clip_logsnr(jnp.interp(k, jnp.arange(self.num_timesteps + 1, dtype=jnp.float32),
                                   table))

  def time_input(self, t, logsnr):
    """The timestep index k - 1 (int32, clipped to 0 at the clean end), fractional
    (float32) with ``interpolate``."""
    del logsnr
    i = jnp.clip(self._k(t) - 1.0, 0.0, float(self.num_timesteps - 1))
    return i if self.interpolate else i.astype(jnp.int32)

  def native_scale(self, logsnr):
    del logsnr

  def sample_t(self, rng, batch: int):
    """Training times: a uniform table index (or U[0, 1] with ``interpolate``)."""
    if self.interpolate:
      return jax.random.uniform(rng, (batch,))
    i = jax.random.randint(rng, (batch,), 1, self.num_timesteps + 1)
    return i.astype(jnp.float32) / self.num_timesteps

  def terminal_alpha(self) -> float:
    """alpha at t = 1 (the noisiest table entry): how far from pure noise it is."""
    return float(np.sqrt(1.0 / (1.0 + np.exp(-self.table[-1]))))

  def describe(self) -> dict:
    return {'kind': self.kind, 'betas': self.betas, 'num_timesteps': int(self.num_timesteps),
            'beta_start': self.beta_start, 'beta_end': self.beta_end,
            'interpolate': self.interpolate}


FLOW_TIME_INPUTS = ('noise_fraction', 'data_fraction')


@dataclasses.dataclass(frozen=True)
class FlowPath:
  """Rectified flow z = (1 - s) x + s eps, s the noise fraction.

  gdistill's t maps to s = shift t / (1 + (shift - 1) t) (SD3 / Flux's shift; 1: none).
  ``time_input``: the network's time is ``noise_fraction`` s (SD3, Flux) or
  ``data_fraction`` 1 - s (kvfrans/jax-flow, where t = 1 is the data), times
  ``time_scale`` (1000 where the network was trained on "1000 t").
  """
  shift: float = 1.0
  time_input_kind: str = 'noise_fraction'
  time_scale: float = 1.0
  kind = 'flow'
  num_timesteps = None

  def __post_init__(self):
    if self.time_input_kind not in FLOW_TIME_INPUTS:
      raise ValueError(f'time_input={self.time_input_kind!r}: expected one of '
                       f'{FLOW_TIME_INPUTS}')
    if not self.shift > 0:
      raise ValueError(f'shift={self.shift}: expected a positive number')

  def logsnr(self, t):
    t = jnp.asarray(t, jnp.float32)
    s = self.shift * t / (1.0 + (self.shift - 1.0) * t)
    return _clip_logsnr(2.0 * (jnp.log1p(-s) - jnp.log(s)))

  @staticmethod
  def noise_fraction(logsnr):
    """s with (1 - s) / s = exp(lambda / 2)."""
    return jax.nn.sigmoid(-0.5 * logsnr)

  def time_input(self, t, logsnr):
    del t
    s = self.noise_fraction(logsnr)
    return self.time_scale * (s if self.time_input_kind == 'noise_fraction' else 1.0 - s)

  def native_scale(self, logsnr):
    s = self.noise_fraction(logsnr)
    return jnp.sqrt(jnp.square(1.0 - s) + jnp.square(s))

  def sample_t(self, rng, batch: int):
    return jax.random.uniform(rng, (batch,))

  def describe(self) -> dict:
    return {'kind': self.kind, 'shift': self.shift, 'time_input': self.time_input_kind,
            'time_scale': self.time_scale}


@dataclasses.dataclass(frozen=True)
class EDMPath:
  """Variance exploding z = x + sigma eps (Karras et al. 2022).

  sigma(t) = (sigma_min^(1/rho) + t (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, the
  network's noise input c_noise = 0.25 log sigma; ``sigma_data`` for the EDM
  preconditioning of ``output='edm'``.
  """
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0
  sigma_data: float = 0.5
  kind = 'edm'
  num_timesteps = None

  def logsnr(self, t):
    t = jnp.asarray(t, jnp.float32)
    lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
    sigma = (lo + t * (hi - lo)) ** self.rho
    return _clip_logsnr(-2.0 * jnp.log(sigma))

  @staticmethod
  def sigma(logsnr):
    return jnp.exp(-0.5 * logsnr)

  def time_input(self, t, logsnr):
    del t
    return 0.25 * jnp.log(self.sigma(logsnr))

  def native_scale(self, logsnr):
    return jnp.sqrt(1.0 + jnp.exp(-logsnr))

  def sample_t(self, rng, batch: int):
    return jax.random.uniform(rng, (batch,))

  def describe(self) -> dict:
    return {'kind': self.kind, 'sigma_min': self.sigma_min, 'sigma_max': self.sigma_max,
            'rho': self.rho, 'sigma_data': self.sigma_data}


COSINE = CosinePath()
KINDS = {'cosine': CosinePath, 'ddpm': DDPMPath, 'flow': FlowPath, 'edm': EDMPath}


def from_dict(d: Optional[dict]):
  """A path from its ``describe()`` dict (None: gdistill's cosine path)."""
  if not d:
    return COSINE
  d = dict(d)
  kind = d.pop('kind', 'cosine')
  if kind not in KINDS:
    raise ValueError(f'noise path kind={kind!r}: expected one of {tuple(KINDS)}')
  if kind == 'flow' and 'time_input' in d:
    d['time_input_kind'] = d.pop('time_input')
  return KINDS[kind](**d)


def check_nested(path, start_steps: int, *, key: str = 'stage2.start_steps') -> None:
  """A discrete path's grid of ``start_steps`` (and so every halving's, each a subset of
  it) must have distinct table entries: at most T steps. ValueError otherwise."""
  t_max = getattr(path, 'num_timesteps', None)
  if t_max is None or getattr(path, 'interpolate', False):
    return
  if start_steps > t_max:
    raise ValueError(
        f'{key}={start_steps}: the teacher\'s table has {t_max} timesteps, so a '
        f'grid of {start_steps} steps would repeat table entries; expected at most {t_max} '
        f'(e.g. {2 ** int(math.log2(t_max))}), or noise_path.interpolate=True for '
        f'fractional timesteps')
