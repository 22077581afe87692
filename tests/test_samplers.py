"""Samplers: exactness with the Gaussian denoiser, the stochastic sampler's
noise, one compilation for every step count, and device-count invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gd_testlib import GaussianData, random_like
from gdistill import compiled_samplers, diffusion, samplers, sharding
from gdistill.denoiser import from_apply

# One image shape for every analytic test, so each compiled sampler is reused.
SHAPE = (16, 16, 16, 4)  # 16384 values: variances to about 1%
DATA = GaussianData(mu=0.3, s=0.5)


def _z(seed=0, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(SHAPE), jnp.float32)


# The step count is a traced argument of every sampler: one compilation each.
_ddim_clip = jax.jit(lambda z, n: samplers.ddim_sample(DATA.denoise_fn, z, num_steps=n))
_ddim = jax.jit(lambda z, n: samplers.ddim_sample(DATA.denoise_fn, z, num_steps=n, clip=False))
_stochastic = jax.jit(lambda z, n, rng: samplers.stochastic_sample(
    DATA.denoise_fn, z, num_steps=n, rng=rng, clip=False))
_encode = jax.jit(lambda x, n: samplers.ddim_encode(DATA.denoise_fn, x, num_steps=n))


# ---- float64 reference -----------------------------------------------------------------------

def _alpha_sigma64(t):
  b = np.arctan(np.exp(-10.0))
  a = np.arctan(np.exp(10.0)) - b
  lam = -2.0 * np.log(np.tan(a * t + b))
  return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam))), lam


def _gain(alpha, sigma):
  """d x_hat / d z of the Gaussian denoiser."""
  return alpha * DATA.s**2 / (alpha**2 * DATA.s**2 + sigma**2)


def _x_hat64(z, t):
  alpha, sigma, _ = _alpha_sigma64(t)
  return DATA.mu + _gain(alpha, sigma) * (z - alpha * DATA.mu)


def test_ddim_sample_matches_method_loop():
  """Against a float64 loop of METHOD.md section 5, clip on (z_1 scaled up so
  that the clip is active)."""
  z1 = _z(scale=3.0)
  clipped = 0.0
  for n in (1, 2, 5):
    z, x_hat = np.asarray(z1, np.float64), None
    for i in range(n, 0, -1):
      t, s = i / n, (i - 1) / n
      (a_t, s_t, _), (a_s, s_s, _) = _alpha_sigma64(t), _alpha_sigma64(s)
      x_hat = _x_hat64(z, t)
      clipped = max(clipped, np.mean(np.abs(x_hat) > 1))
      x_hat = np.clip(x_hat, -1, 1)
      z = a_s * x_hat + s_s * (z - a_t * x_hat) / s_t
    got = _ddim_clip(z1, n)
    np.testing.assert_allclose(got, x_hat, rtol=1e-4, atol=1e-4)
  assert clipped > 0.01  # the clip mattered
  np.testing.assert_array_equal(_ddim_clip(z1, 5), got)  # deterministic


def test_ddim_encode_then_sample_returns_the_input():
  """Encode (t: 0 -> 1) then decode (1 -> 0) with the exact denoiser.

  DDIM is a first-order solver of the probability-flow ODE: for Gaussian data
  each step contracts x - mu by the cosine of its step in angle, so the round
  trip misses by about a^2 / N (a ~ pi/2 for this schedule): 0.24% at N = 1024.
  """
  x0 = jnp.clip(DATA.mu + DATA.s * _z(1), -1, 1)
  errs = {n: float(jnp.max(jnp.abs(_ddim(_encode(x0, n), n) - x0))) for n in (256, 1024)}
  scale = float(jnp.max(jnp.abs(x0 - DATA.mu)))
  assert errs[1024] < 4e-3 * scale, errs
  assert errs[256] / errs[1024] == pytest.approx(4.0, rel=0.25), errs  # first order in 1/N


def test_ddim_encode_of_data_is_standard_normal():
  """The encoder maps data x ~ N(mu, s^2) to the prior, z_1 ~ N(0, 1) (here
  alpha_1 = 5e-5, so the mu term vanishes)."""
  x0 = DATA.mu + DATA.s * _z(2)
  z1 = _encode(x0, 512)
  assert float(jnp.std(z1)) == pytest.approx(1.0, abs=0.03)
  assert float(jnp.mean(z1)) == pytest.approx(0.0, abs=0.03)


def test_forward_resample_variance():
  """sigma_{s|k}^2 = (1 - exp(lambda_s - lambda_k)) sigma_s^2, mean (alpha_s/alpha_k) z_k."""
  l_k, l_s = jnp.float32(1.5), jnp.float32(-0.5)
  noise = _z(3)
  z_k = jnp.full(SHAPE, 0.7)
  z_s = diffusion.forward_resample(z_k=z_k, logsnr_k=l_k, logsnr_s=l_s, noise=noise)
  a_k, _ = diffusion.alpha_sigma(l_k)
  a_s, s_s = diffusion.alpha_sigma(l_s)
  want_var = (1 - np.exp(float(l_s - l_k))) * float(s_s) ** 2
  assert float(jnp.var(z_s)) == pytest.approx(want_var, rel=0.03)
  assert float(jnp.mean(z_s)) == pytest.approx(float(a_s / a_k) * 0.7, abs=0.01)
  # Marginals stay right: z_k ~ q(z_k | x) => z_s ~ q(z_s | x).
  x = 0.4
  z_k = diffusion.diffuse(x=jnp.full(SHAPE, x), eps=_z(4), logsnr=l_k)
  z_s = diffusion.forward_resample(z_k=z_k, logsnr_k=l_k, logsnr_s=l_s, noise=noise)
  assert float(jnp.mean(z_s)) == pytest.approx(float(a_s) * x, abs=0.02)
  assert float(jnp.var(z_s)) == pytest.approx(float(s_s) ** 2, rel=0.03)


@pytest.mark.parametrize('n', [2, 4])
def test_stochastic_sampler_output_variance(n):
  """Through the whole sampler, against a float64 propagation of the variance
  the re-noising adds (fixed z_1, two rngs): steps from t = i/N go to
  k = t - 2/N, then are re-noised to s = t - 1/N; the last step is deterministic."""
  z1 = _z(5)
  a = _stochastic(z1, n, jax.random.PRNGKey(1))
  b = _stochastic(z1, n, jax.random.PRNGKey(2))
  got = float(jnp.var(a - b)) / 2  # the z_1-dependent mean cancels
  var = 0.0
  for i in range(n, 1, -1):
    t, k, s = i / n, max(i - 2, 0) / n, (i - 1) / n
    (a_t, s_t, _), (a_k, s_k, l_k), (a_s, s_s, l_s) = map(_alpha_sigma64, (t, k, s))
    g = _gain(a_t, s_t)
    dz_k = a_k * g + (s_k / s_t) * (1 - a_t * g)  # d z_k / d z_t
    var = (a_s / a_k * dz_k) ** 2 * var + (1 - np.exp(l_s - l_k)) * s_s**2
  a_t, s_t, _ = _alpha_sigma64(1 / n)
  assert got == pytest.approx(_gain(a_t, s_t) ** 2 * var, rel=0.04)


def test_stochastic_sampler_mean_is_ddim_with_double_steps():
  """E over the noise: at N = 2 the stochastic step t=1 -> k=0 -> s=1/2 re-noises
  the DDIM jump to 0; averaged over 16384 values the sample is affine in z_1 with
  the slope the float64 reference gives."""
  z1 = _z(6)
  x = _stochastic(z1, 2, jax.random.PRNGKey(0))
  (a1, s1, _), (a0, s0, _), (ah, sh, _) = map(_alpha_sigma64, (1.0, 0.0, 0.5))
  g1 = _gain(a1, s1)
  x1 = DATA.mu + g1 * (np.asarray(z1, np.float64) - a1 * DATA.mu)
  z_k = a0 * x1 + s0 * (np.asarray(z1) - a1 * x1) / s1
  mean_zs = ah / a0 * z_k
  want_mean = DATA.mu + _gain(ah, sh) * (mean_zs - ah * DATA.mu)
  resid = np.asarray(x, np.float64) - want_mean
  assert abs(resid.mean()) < 0.01
  assert abs(np.corrcoef(resid.ravel(), np.asarray(z1).ravel())[0, 1]) < 0.03


def test_stochastic_last_step_is_deterministic():
  z1 = _z(7)
  det = _ddim(z1, 1)
  for seed in (0, 1):
    np.testing.assert_array_equal(_stochastic(z1, 1, jax.random.PRNGKey(seed)), det)
  # With more steps it is random, and reproducible given the rng.
  s1 = _stochastic(z1, 4, jax.random.PRNGKey(0))
  assert not np.allclose(s1, _stochastic(z1, 4, jax.random.PRNGKey(1)), atol=1e-3)
  np.testing.assert_array_equal(s1, _stochastic(z1, 4, jax.random.PRNGKey(0)))


def test_sample_dispatch_errors():
  z1 = jnp.zeros((1, 2, 2, 1))
  with pytest.raises(ValueError, match='rng'):
    samplers.sample('stochastic', DATA.denoise_fn, z1, num_steps=2)
  with pytest.raises(ValueError, match='sampler'):
    samplers.sample('ancestral', DATA.denoise_fn, z1, num_steps=2)


# ---- compiled samplers of a network ------------------------------------------------------------

@pytest.fixture(scope='module')
def student(tiny_nets):
  """The tiny w-conditioned U-Net with random weights, and its compiled
  stochastic sampler (shared by the tests below)."""
  fn = compiled_samplers.make_sample_fn(
      from_apply(tiny_nets['with_w'].apply, mean_type='v', num_classes=tiny_nets['num_classes']),
      mode='student', sampler='stochastic')
  grid = lambda params, num_steps, sharding=None: compiled_samplers.class_grid(
      fn, params, num_classes=tiny_nets['num_classes'], per_class=4,
      image_shape=tiny_nets['shape'], w=2.0, num_steps=num_steps, seed=7, sharding=sharding)
  return dict(tiny_nets, params=random_like(tiny_nets['fresh_w'], seed=5), fn=fn, grid=grid)


def test_make_sample_fn_compiles_once_for_all_step_counts(student):
  before = student['fn']._cache_size()  # pylint: disable=protected-access
  outs = [student['grid'](student['params'], n) for n in (4, 8, 16)]
  assert student['fn']._cache_size() - before <= 1  # pylint: disable=protected-access
  assert not np.allclose(outs[0], outs[2], atol=1e-4)  # the step count was honoured


def test_aot_sampler_compiles_once_logs_once_and_matches_jit(student):
  messages = []
  aot = compiled_samplers.AotSampler(student['fn'], name='student/stochastic', log=messages.append)
  grid = lambda fn, n: compiled_samplers.class_grid(
      fn, student['params'], num_classes=student['num_classes'], per_class=4,
      image_shape=student['shape'], w=2.0, num_steps=n, seed=7)
  outs = [grid(aot, n) for n in (4, 8, 16)]
  assert len(aot.compiled) == 1 and len(messages) == 1, messages
  assert messages[0].startswith('compiled the student/stochastic sampler in ')
  np.testing.assert_allclose(outs[1], grid(student['fn'], 8), atol=1e-5)
  assert not np.allclose(outs[0], outs[2], atol=1e-4)


def test_make_sample_fn_rejects_unknown_mode(student):
  with pytest.raises(ValueError, match='mode'):
    compiled_samplers.make_sample_fn(from_apply(student['base'].apply, mean_type='v',
                                                num_classes=10), mode='unguided', sampler='ddim')


def test_same_seed_same_images_on_1_and_8_devices(student, devices8):
  """class_grid with the batch sharded over 8 devices, and on one device."""
  mesh8 = sharding.make_mesh({'data': -1}, devices8)
  params8 = jax.device_put(student['params'], sharding.replicated(mesh8))
  x8 = student['grid'](params8, 4, sharding.batch_sharding(mesh8))
  x1 = student['grid'](student['params'], 4)
  assert x8.shape == (10, 4, *student['shape'])
  assert np.abs(x1).max() > 1e-2
  np.testing.assert_allclose(x8, x1, rtol=1e-5, atol=1e-5)
  assert not np.allclose(x1[0], x1[1], atol=1e-3)  # the label reached the network
