"""An analytic guided teacher: per-class Gaussian mixtures, whose E[x | z_t, c] is exact.

Class c's data is x ~ sum_k pi_k N(mu_ck, s^2 I) (k components); the unconditional
data is the mixture of all classes. On the VP path z = alpha x + sigma eps:

  z | (c, k) ~ N(alpha mu_ck, (alpha^2 s^2 + sigma^2) I),
  E[x | z, c, k] = mu_ck + alpha s^2 / (alpha^2 s^2 + sigma^2) (z - alpha mu_ck),
  E[x | z, c] = sum_k r_k(z) E[x | z, c, k], r_k the posterior component weights.

``GaussianMixtureTeacher.networks()`` wraps that one posterior in the conventions of five
real codebases (``gdistill.denoiser``), each a network that computes its own output type
from its own inputs; through the protocol all five must give the same x_hat.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gdistill import denoiser, diffusion, noise_paths


class GaussianMixtureTeacher:
  """``num_classes`` classes of ``num_components`` Gaussians in images of ``shape``."""

  def __init__(self, *, num_classes=3, num_components=2, shape=(2, 2, 2), s=0.15, seed=0):
    gen = np.random.default_rng(seed)
    self.k, self.shape, self.s = num_classes, tuple(shape), s
    self.mu = jnp.asarray(gen.uniform(-0.7, 0.7, (num_classes, num_components, *shape)),
                          jnp.float32)  # [C, K, H, W, D]
    self.log_pi = jnp.log(jnp.asarray(gen.dirichlet(np.ones(num_components) * 3, num_classes),
                                      jnp.float32))  # [C, K]

  def sample(self, rng, label):
    """x [B, *shape] of classes ``label`` [B]."""
    k_rng, e_rng = jax.random.split(rng)
    comp = jax.random.categorical(k_rng, self.log_pi[label])  # [B]
    mu = self.mu[label, comp]
    return mu + self.s * jax.random.normal(e_rng, mu.shape)

  def x_hat(self, z, logsnr, label):
    """E[x | z_vp, c]; ``label`` [B] int in 0..K (K: the unconditional mixture)."""
    alpha, sigma = diffusion.alpha_sigma(jnp.asarray(logsnr, jnp.float32))
    b = z.shape[0]
    alpha = jnp.broadcast_to(alpha, (b,)).reshape(b, 1, *(1,) * len(self.shape))
    sigma = jnp.broadcast_to(sigma, (b,)).reshape(b, 1, *(1,) * len(self.shape))
    # Components of every class, [C * K, ...]; the unconditional weights are pi / C.
    mu = self.mu.reshape(-1, *self.shape)[None]  # [1, CK, ...]
    log_w_all = (self.log_pi - jnp.log(self.k)).reshape(-1)  # [CK]
    own = jnp.arange(self.k * self.mu.shape[1]) // self.mu.shape[1]  # class of each component
    cond = label[:, None] == own[None, :]
    log_w = jnp.where(label[:, None] == self.k, log_w_all[None],
                      jnp.where(cond, self.log_pi.reshape(-1)[None], -jnp.inf))  # [B, CK]
    var = alpha**2 * self.s**2 + sigma**2  # [B, 1, ...]
    d = z[:, None] - alpha * mu
    axes = tuple(range(2, d.ndim))
    log_lik = -0.5 * jnp.sum(d * d / var, axis=axes)  # the shared normaliser cancels
    r = jax.nn.softmax(log_w + log_lik, axis=-1)  # [B, CK]
    x_k = mu + alpha * self.s**2 / var * d  # [B, CK, ...]
    return jnp.einsum('bk,bk...->b...', r, x_k)

  # ---- the same posterior in five codebases' conventions ------------------------------

  def networks(self) -> dict:
    """name -> Denoiser (each maps gdistill's labels to its condition)."""
    k, gm = self.k, self
    ddpm = noise_paths.DDPMPath(betas='linear', num_timesteps=1000)
    ddpm_table = jnp.asarray(ddpm.table, jnp.float32)
    flow = noise_paths.FlowPath(shift=3.0, time_input_kind='data_fraction', time_scale=1000.0)
    edm = noise_paths.EDMPath()

    def eps_ddpm_nchw(params, z, timestep, y, *, train=False, rngs=None):
      """DiT-like: NCHW, integer timestep 0..999, eps, null label 0 (classes 1..K)."""
      del params, train, rngs
      assert z.ndim == 4 and timestep.dtype == jnp.int32, (z.shape, timestep.dtype)
      lam = ddpm_table[timestep + 1]
      zh = jnp.transpose(z, (0, 2, 3, 1))
      x = gm.x_hat(zh, lam, jnp.where(y == 0, k, y - 1))
      a, s = diffusion.alpha_sigma(lam)
      eps = (zh - a[:, None, None, None] * x) / s[:, None, None, None]
      return jnp.transpose(eps, (0, 3, 1, 2))

    def v_cosine(params, z, logsnr, label, *, train=False, rngs=None):
      del params, train, rngs
      x = gm.x_hat(z, logsnr, label)
      a, s = diffusion.alpha_sigma(logsnr)
      eps = (z - a[:, None, None, None] * x) / s[:, None, None, None]
      return a[:, None, None, None] * eps - s[:, None, None, None] * x

    def flow_net(params, z, tau, label, *, train=False, rngs=None):
      """jax-flow-like: z = (1 - s) x + s eps, time 1000 (1 - s), output x - eps."""
      del params, train, rngs
      s = 1.0 - tau / 1000.0
      lam = 2.0 * (jnp.log1p(-s) - jnp.log(s))
      c = jnp.sqrt((1 - s) ** 2 + s**2)[:, None, None, None]
      x = gm.x_hat(z / c, lam, label)
      eps = (z - (1 - s)[:, None, None, None] * x) / s[:, None, None, None]
      return x - eps

    def edm_net(params, z_in, c_noise, label, *, train=False, rngs=None):
      """EDM-like: F with D = c_skip z + c_out F(c_in z, 0.25 log sigma)."""
      del params, train, rngs
      sigma, sd = jnp.exp(4.0 * c_noise), edm.sigma_data
      sb = sigma[:, None, None, None]
      z = z_in * jnp.sqrt(sb**2 + sd**2)
      x = gm.x_hat(z / jnp.sqrt(1 + sb**2), -2.0 * jnp.log(sigma), label)
      c_skip, c_out = sd**2 / (sb**2 + sd**2), sb * sd / jnp.sqrt(sb**2 + sd**2)
      return (x - c_skip * z) / c_out

    def x_embedding(params, z, logsnr, emb, *, train=False, rngs=None):
      """An x-predicting network with an embedding-vector condition (zeros: null)."""
      del params, train, rngs
      label = jnp.where(jnp.abs(emb).sum(-1) == 0, k, jnp.argmax(emb, -1))
      return gm.x_hat(z, logsnr, label)

    return {
        'eps_ddpm_nchw_int': denoiser.Denoiser(eps_ddpm_nchw, output='eps', path=ddpm,
                                               null_cond=0, layout='NCHW',
                                               label_to_cond=_plus_one),
        'v_cosine': denoiser.Denoiser(v_cosine, output='v', null_cond=k),
        'flow': denoiser.Denoiser(flow_net, output='flow_to_data', path=flow, null_cond=k),
        'edm': denoiser.Denoiser(edm_net, output='edm', path=edm, null_cond=k),
        'x_embedding': denoiser.Denoiser(x_embedding, output='x',
                                         null_cond=np.zeros((k,), np.float32),
                                         label_to_cond=functools.partial(jax.nn.one_hot,
                                                                         num_classes=k)),
    }


def _plus_one(label):
  return label + 1
