"""Exact identities of gdistill.diffusion (METHOD.md sections 1, 2 and 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdistill import diffusion

RTOL, ATOL = 2e-5, 2e-5


def _data(seed=0, shape=(5, 4, 4, 2)):
  kx, ke, kl = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.uniform(kx, shape, minval=-1.0, maxval=1.0)
  eps = jax.random.normal(ke, shape)
  logsnr = jax.random.uniform(kl, shape[:1], minval=-8.0, maxval=8.0)  # per example [B]
  return x, eps, logsnr


# ---- schedule -----------------------------------------------------------------

def test_schedule_endpoints():
  np.testing.assert_allclose(diffusion.logsnr_schedule_cosine(0.0), 20.0, atol=1e-4)
  # tan near pi/2 in float32 loses digits: -20 to about 1e-2.
  np.testing.assert_allclose(diffusion.logsnr_schedule_cosine(1.0), -20.0, atol=2e-2)
  # The cosine schedule in closed form: lambda(1/2) = -2 log tan((a + 2b) / 2).
  b = np.arctan(np.exp(-10.0))
  a = np.arctan(np.exp(10.0)) - b
  for t in (0.1, 0.5, 0.9):
    np.testing.assert_allclose(diffusion.logsnr_schedule_cosine(t),
                               -2.0 * np.log(np.tan(a * t + b)), rtol=1e-4, atol=1e-4)


def test_schedule_monotone_decreasing():
  lam = np.asarray(diffusion.logsnr_schedule_cosine(jnp.linspace(0.0, 1.0, 4097)))
  assert np.all(np.isfinite(lam))
  assert np.all(np.diff(lam) < 0)


def test_alpha_sigma_unit_norm_and_snr():
  lam = jnp.linspace(-20.0, 20.0, 401)
  alpha, sigma = diffusion.alpha_sigma(lam)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)
  mid = np.abs(np.asarray(lam)) < 15  # where float32 resolves the ratio
  np.testing.assert_allclose(np.log(alpha**2 / sigma**2)[mid], np.asarray(lam)[mid], atol=1e-4)


# ---- parameterisations ----------------------------------------------------------

def test_round_trips_x_eps_v():
  x, eps, logsnr = _data()
  z = diffusion.diffuse(x=x, eps=eps, logsnr=logsnr)
  alpha, sigma = diffusion.alpha_sigma(logsnr)
  np.testing.assert_allclose(z, alpha[:, None, None, None] * x + sigma[:, None, None, None] * eps,
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(diffusion.eps_from_x(z_t=z, x=x, logsnr=logsnr), eps,
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(diffusion.x_from_eps(z_t=z, eps=eps, logsnr=logsnr), x,
                             rtol=1e-4, atol=1e-4)
  v = diffusion.v_from_x_eps(x=x, eps=eps, logsnr=logsnr)
  np.testing.assert_allclose(diffusion.x_from_v(z_t=z, v=v, logsnr=logsnr), x, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(diffusion.eps_from_v(z_t=z, v=v, logsnr=logsnr), eps,
                             rtol=RTOL, atol=ATOL)
  for mean_type, out in (('x', x), ('eps', eps), ('v', v)):
    np.testing.assert_allclose(
        diffusion.x_from_output(z_t=z, output=out, logsnr=logsnr, mean_type=mean_type), x,
        rtol=1e-4, atol=1e-4)


def test_x_from_output_rejects_unknown_mean_type():
  x, _, logsnr = _data()
  with pytest.raises(ValueError, match='mean_type'):
    diffusion.x_from_output(z_t=x, output=x, logsnr=logsnr, mean_type='score')


# ---- DDIM and the distillation target ---------------------------------------------

@pytest.mark.parametrize('l_t,l_s', [(-3.0, 2.0), (0.5, 6.0), (4.0, -2.0), (-18.0, 19.0)])
def test_ddim_step_with_true_x_lands_on_forward_process(l_t, l_s):
  """With x_hat = x, eps_hat(z_t) = eps, so the step is exactly q(z_s | x, eps), either way."""
  x, eps, _ = _data(1)
  b = x.shape[0]
  l_t, l_s = jnp.full((b,), l_t), jnp.full((b,), l_s)
  z_t = diffusion.diffuse(x=x, eps=eps, logsnr=l_t)
  z_s = diffusion.ddim_step(z_t=z_t, x_hat=x, logsnr_t=l_t, logsnr_s=l_s)
  np.testing.assert_allclose(z_s, diffusion.diffuse(x=x, eps=eps, logsnr=l_s), rtol=1e-4, atol=1e-4)


def test_ddim_step_matches_formula_with_wrong_x():
  x, eps, l_t = _data(2)
  x_hat = jnp.tanh(x + 0.7)  # anything but x
  l_s = l_t + 1.5
  z_t = diffusion.diffuse(x=x, eps=eps, logsnr=l_t)
  a_t, s_t = (v[:, None, None, None] for v in diffusion.alpha_sigma(l_t))
  a_s, s_s = (v[:, None, None, None] for v in diffusion.alpha_sigma(l_s))
  want = a_s * x_hat + s_s * (z_t - a_t * x_hat) / s_t
  np.testing.assert_allclose(diffusion.ddim_step(z_t=z_t, x_hat=x_hat, logsnr_t=l_t, logsnr_s=l_s),
                             want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('gap', [0.05, 0.5, 3.0])
def test_distillation_target_inverts_ddim_step(gap):
  x, eps, l_t = _data(3)
  z_t = diffusion.diffuse(x=x, eps=eps, logsnr=l_t)
  x_tilde = jnp.sin(3.0 * x)
  l_u = l_t + gap
  z_target = diffusion.ddim_step(z_t=z_t, x_hat=x_tilde, logsnr_t=l_t, logsnr_s=l_u)
  got = diffusion.distillation_target(z_t=z_t, z_target=z_target, logsnr_t=l_t, logsnr_target=l_u)
  # The inversion divides by alpha_u - (sigma_u / sigma_t) alpha_t, small for small gaps.
  np.testing.assert_allclose(got, x_tilde, atol=1e-4 / gap)


def test_distillation_target_is_the_method_formula():
  x, eps, l_t = _data(4)
  z_t = diffusion.diffuse(x=x, eps=eps, logsnr=l_t)
  z_u = jnp.cos(x) + eps
  l_u = l_t + 2.0
  a_t, s_t = (v[:, None, None, None] for v in diffusion.alpha_sigma(l_t))
  a_u, s_u = (v[:, None, None, None] for v in diffusion.alpha_sigma(l_u))
  want = (z_u - (s_u / s_t) * z_t) / (a_u - (s_u / s_t) * a_t)
  np.testing.assert_allclose(
      diffusion.distillation_target(z_t=z_t, z_target=z_u, logsnr_t=l_t, logsnr_target=l_u),
      want, rtol=1e-4, atol=1e-4)


# ---- guidance -----------------------------------------------------------------

def test_guided_formula_and_w0():
  x, eps, _ = _data(5)
  w = jnp.array([0.0, 0.5, 1.0, 2.0, 4.0])
  got = diffusion.guided(cond=x, uncond=eps, w=w)
  np.testing.assert_allclose(got, (1 + w[:, None, None, None]) * x - w[:, None, None, None] * eps,
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(got[0], x[0])
  np.testing.assert_allclose(diffusion.guided(cond=x, uncond=eps, w=3.0), 4 * x - 3 * eps,
                             rtol=RTOL, atol=ATOL)


def test_guidance_same_in_x_eps_and_v_space():
  """The conversions are affine with weights summing to 1 (METHOD.md section 2)."""
  x, eps, logsnr = _data(6)
  z = diffusion.diffuse(x=x, eps=eps, logsnr=logsnr)
  x_c, x_u = jnp.tanh(x + 0.3), jnp.tanh(0.5 * x - 0.2)  # two different predictions
  w = jnp.array([0.0, 0.3, 1.0, 2.5, 4.0])
  x_space = diffusion.guided(cond=x_c, uncond=x_u, w=w)

  e_c = diffusion.eps_from_x(z_t=z, x=x_c, logsnr=logsnr)
  e_u = diffusion.eps_from_x(z_t=z, x=x_u, logsnr=logsnr)
  eps_space = diffusion.x_from_eps(z_t=z, eps=diffusion.guided(cond=e_c, uncond=e_u, w=w),
                                   logsnr=logsnr)
  np.testing.assert_allclose(eps_space, x_space, rtol=1e-3, atol=1e-3)

  v_c = diffusion.v_from_x_eps(x=x_c, eps=e_c, logsnr=logsnr)
  v_u = diffusion.v_from_x_eps(x=x_u, eps=e_u, logsnr=logsnr)
  v_space = diffusion.x_from_v(z_t=z, v=diffusion.guided(cond=v_c, uncond=v_u, w=w), logsnr=logsnr)
  np.testing.assert_allclose(v_space, x_space, rtol=1e-4, atol=1e-4)
  assert not np.allclose(x_space[1:], x_c[1:], atol=1e-2)  # guidance did something


# ---- loss weights -----------------------------------------------------------------

def test_loss_weights_at_known_logsnr():
  lam = jnp.array([-5.0, 0.0, np.log(4.0), np.log(9.0)])
  np.testing.assert_allclose(diffusion.loss_weight(lam, weighting='snr_trunc'),
                             [1.0, 1.0, 4.0, 9.0], rtol=1e-6)
  np.testing.assert_allclose(diffusion.loss_weight(lam, weighting='snr_plus_one'),
                             [1.0 + np.exp(-5.0), 2.0, 5.0, 10.0], rtol=1e-6)
  np.testing.assert_allclose(diffusion.loss_weight(lam, weighting='snr'),
                             [np.exp(-5.0), 1.0, 4.0, 9.0], rtol=1e-6)
  np.testing.assert_allclose(diffusion.loss_weight(lam, weighting='constant'), [1.0] * 4)
  with pytest.raises(ValueError, match='weighting'):
    diffusion.loss_weight(lam, weighting='p2')


def test_weighted_mse_equals_max_of_x_and_eps_mse_and_v_mse():
  """snr_trunc = max(x-MSE, eps-MSE); snr_plus_one = v-MSE (METHOD.md section 1); the
  authors' 'snr' = eps-MSE and 'constant' = x-MSE (ddpm_w_distillation/dpm.py)."""
  x, eps, _ = _data(7)
  logsnr = jnp.array([-4.0, -1.0, 0.0, 1.0, 4.0])
  z = diffusion.diffuse(x=x, eps=eps, logsnr=logsnr)
  x_hat = x + 0.1 * jnp.cos(5 * x)
  eps_hat = diffusion.eps_from_x(z_t=z, x=x_hat, logsnr=logsnr)
  v = diffusion.v_from_x_eps(x=x, eps=eps, logsnr=logsnr)
  v_hat = diffusion.v_from_x_eps(x=x_hat, eps=eps_hat, logsnr=logsnr)
  mse = lambda a, b: jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
  np.testing.assert_allclose(
      diffusion.weighted_x_mse(x_hat=x_hat, x_target=x, logsnr=logsnr, weighting='snr_trunc'),
      jnp.maximum(mse(x_hat, x), mse(eps_hat, eps)), rtol=1e-4)
  np.testing.assert_allclose(
      diffusion.weighted_x_mse(x_hat=x_hat, x_target=x, logsnr=logsnr, weighting='snr_plus_one'),
      mse(v_hat, v), rtol=1e-4)
  np.testing.assert_allclose(
      diffusion.weighted_x_mse(x_hat=x_hat, x_target=x, logsnr=logsnr, weighting='snr'),
      mse(eps_hat, eps), rtol=1e-4)
  np.testing.assert_allclose(
      diffusion.weighted_x_mse(x_hat=x_hat, x_target=x, logsnr=logsnr, weighting='constant'),
      mse(x_hat, x), rtol=1e-6)
