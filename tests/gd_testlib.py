"""Helpers shared by the tests (imported as a plain module from tests/)."""

import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np

import pytest

from gdistill import diffusion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unpack_commit(commit: str, dest: str, *paths: str) -> str:
  """The tree of ``commit`` (or only ``paths`` of it) unpacked into ``dest``, from this
  checkout's history; skips the test where git or the commit is absent."""
  try:
    archive = subprocess.run(['git', 'archive', commit, *paths], cwd=REPO,
                             capture_output=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    pytest.skip(f'git history with {commit} not available in {REPO} (a shallow clone or no '
                f'git checkout: git fetch --unshallow): {e}')
  os.makedirs(dest, exist_ok=True)
  subprocess.run(['tar', '-x', '-C', dest], input=archive, check=True)
  return dest


# Random weights come from numpy, not jax.random: compiling threefry for a
# hundred parameter shapes costs far more CPU than the tests themselves.

def random_like(tree, seed, scale=0.1):
  """A tree of N(0, scale^2) float32 arrays with the shapes of ``tree`` (arrays or
  ShapeDtypeStructs)."""
  gen = np.random.default_rng(seed)
  return jax.tree.map(
      lambda l: jnp.asarray(scale * gen.standard_normal(l.shape), jnp.float32), tree)


def perturb_params(params, seed, scale=0.1):
  """Adds N(0, scale^2) noise to every leaf, so zero-initialised layers (the
  U-Net's output conv, the w branch's last layer) no longer hide the inputs."""
  gen = np.random.default_rng(seed)
  return jax.tree.map(  # on the host: no per-shape XLA compilations
      lambda p: jnp.asarray(np.asarray(p) + scale * gen.standard_normal(p.shape), jnp.float32),
      params)


class GaussianData:
  """Data x ~ N(mu, s^2 I): its exact denoiser in the VP process.

  E[x | z_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (z_t - alpha mu).
  """

  def __init__(self, mu=0.3, s=0.5):
    self.mu, self.s = mu, s

  def x_hat(self, z_t, logsnr):
    alpha, sigma = diffusion.alpha_sigma(jnp.asarray(logsnr, jnp.float32))
    alpha = jnp.reshape(alpha, jnp.shape(alpha) + (1,) * (z_t.ndim - jnp.ndim(alpha)))
    sigma = jnp.reshape(sigma, jnp.shape(sigma) + (1,) * (z_t.ndim - jnp.ndim(sigma)))
    gain = alpha * self.s**2 / (alpha**2 * self.s**2 + sigma**2)
    return self.mu + gain * (z_t - alpha * self.mu)

  def denoise_fn(self, z_t, t):
    """``denoise_fn(z_t, t)`` with t a scalar or [B]."""
    return self.x_hat(z_t, diffusion.logsnr_schedule_cosine(t))


