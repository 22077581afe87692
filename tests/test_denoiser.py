"""The denoiser protocol: five codebases' conventions give one x_hat; noise paths; the
discrete table's nested grids; the errors a user meets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmm_teacher import GaussianMixtureTeacher
from gdistill import denoiser, losses, noise_paths

B = 24
GM = GaussianMixtureTeacher()
NETS = GM.networks()


def _inputs(path, seed=0):
  """z_vp at times t spread over (0, 1] of ``path`` and labels 0..K-1."""
  gen = np.random.default_rng(seed)
  t = jnp.asarray(np.linspace(0.02, 1.0, B), jnp.float32)
  label = jnp.asarray(gen.integers(0, GM.k, B), jnp.int32)
  x = GM.sample(jax.random.PRNGKey(seed), label)
  logsnr = path.logsnr(t)
  eps = jnp.asarray(gen.standard_normal(x.shape), jnp.float32)
  from gdistill import diffusion  # pylint: disable=g-import-not-at-top
  return t, logsnr, diffusion.diffuse(x=x, eps=eps, logsnr=logsnr), label


@pytest.mark.parametrize('name', sorted(NETS))
def test_five_conventions_give_the_exact_x_hat(name):
  net = NETS[name]
  t, logsnr, z, label = _inputs(net.path)
  want = GM.x_hat(z, logsnr, label)
  got = jax.jit(lambda z, t, lam, c: net.x_hat(None, z, t=t, logsnr=lam, cond=c))(
      z, t, logsnr, label)
  # x = (z - sigma eps) / alpha: an eps network's float32 roundoff grows as 1 / alpha.
  alpha = np.sqrt(jax.nn.sigmoid(logsnr))[:, None, None, None]
  tol = 1e-5 / alpha if net.output == 'eps' else 1e-5
  assert np.all(np.abs(np.asarray(got) - np.asarray(want)) <= tol + 1e-5 * np.abs(want))


@pytest.mark.parametrize('name', sorted(NETS))
def test_guided_x_hat_combines_cond_and_null(name):
  net = NETS[name]
  t, logsnr, z, label = _inputs(net.path, seed=1)
  w = jnp.linspace(0.0, 4.0, B)
  got = jax.jit(lambda z, t, lam, c, w: net.guided_x_hat(None, z, t=t, logsnr=lam, cond=c, w=w))(
      z, t, logsnr, label, w)
  cond, uncond = GM.x_hat(z, logsnr, label), GM.x_hat(z, logsnr, jnp.full_like(label, GM.k))
  want = (1 + w[:, None, None, None]) * cond - w[:, None, None, None] * uncond
  alpha = np.sqrt(jax.nn.sigmoid(logsnr))[:, None, None, None]
  scale = (1 + 2 * np.asarray(w))[:, None, None, None] * (1 / alpha if net.output == 'eps' else 1)
  np.testing.assert_array_less(np.abs(np.asarray(got) - np.asarray(want)),
                               1e-5 * scale + 1e-5 * np.abs(np.asarray(want)) + 1e-7)
  assert np.abs(np.asarray(cond - uncond)).max() > 0.05  # guidance changes something


def test_paths_are_variance_preserving_and_span_the_noise_range():
  t = jnp.linspace(0.0, 1.0, 257)
  for path in (noise_paths.COSINE, noise_paths.DDPMPath(), noise_paths.FlowPath(shift=3.0),
               noise_paths.EDMPath()):
    lam = np.asarray(path.logsnr(t))
    assert np.all(np.diff(lam) <= 1e-6), path  # noise only grows with t
    assert lam[0] > 5 and lam[-1] < -5, (path, lam[0], lam[-1])


def test_native_scale_matches_each_path():
  """z_native = sqrt(a^2 + b^2) z_vp: flow a = 1 - s, b = s; EDM a = 1, b = sigma."""
  t = jnp.asarray([0.1, 0.5, 0.9])
  flow = noise_paths.FlowPath(shift=2.0)
  s = 2.0 * t / (1 + t)
  np.testing.assert_allclose(flow.native_scale(flow.logsnr(t)), np.sqrt((1 - s)**2 + s**2),
                             rtol=1e-5)
  edm = noise_paths.EDMPath()
  sigma = np.exp(-0.5 * np.asarray(edm.logsnr(t)))
  np.testing.assert_allclose(edm.native_scale(edm.logsnr(t)), np.sqrt(1 + sigma**2), rtol=1e-5)
  assert noise_paths.COSINE.native_scale(jnp.zeros(3)) is None


def test_ddpm_table_matches_diffusers_linear_and_scaled_linear():
  """alpha_bar of diffusers' DDPMScheduler: betas linspace(1e-4, 0.02) and SD's
  linspace(sqrt(0.00085), sqrt(0.012))^2; SD's alpha(1) = 0.068 (far from pure noise)."""
  abar = noise_paths.ddpm_alphas_cumprod('linear', 1000, 1e-4, 0.02)
  np.testing.assert_allclose(abar[[0, 999]], [0.9999, 4.036e-5], rtol=1e-3)
  sd = noise_paths.DDPMPath(betas='scaled_linear', beta_start=0.00085, beta_end=0.012)
  assert sd.terminal_alpha() == pytest.approx(0.0683, abs=5e-4)


@pytest.mark.parametrize('t_max,start', [(1000, 512), (1000, 1000), (250, 128)])
def test_every_halving_queries_the_table_on_nested_grids(t_max, start):
  """From ``start`` steps down to 1, each halving's teacher times t, t' and t'' are
  table entries (the network gets the integer index whose lambda the step uses), and
  each student's grid is a subset of its teacher's."""
  path = noise_paths.DDPMPath(num_timesteps=t_max)
  noise_paths.check_nested(path, start)
  table = path.table

  @functools.partial(jax.jit, static_argnums=1)
  def queried(t, n):
    """Every time stage2_target asks the teacher about, compiled (eager ops are slow)."""
    recorded = []

    def x_fn(z, s):
      recorded.append(s)
      return jnp.zeros_like(z)
    losses.stage2_target(x_fn, z_t=jnp.zeros((n, 1, 1, 1)), t=t, student_steps=n, path=path)
    return jnp.concatenate(recorded)

  n = start // 2
  while n >= 1:
    q = np.asarray(queried(jnp.arange(1, n + 1, dtype=jnp.float32) / n, n))
    index = np.asarray(path.time_input(q, None))
    k = np.asarray(path._k(q))  # pylint: disable=protected-access
    np.testing.assert_array_equal(k, np.round(q * t_max))  # on the table
    np.testing.assert_array_equal(index, k - 1)
    np.testing.assert_array_equal(np.asarray(path.logsnr(q)), np.float32(table[k.astype(int)]))
    student = set(np.round(np.arange(1, n + 1) / n * t_max).astype(int))
    teacher = set(np.round(np.arange(1, 2 * n + 1) / (2 * n) * t_max).astype(int))
    assert student <= teacher and len(student) == n
    n //= 2


def test_a_start_the_table_cannot_nest_is_refused():
  with pytest.raises(ValueError, match=r'stage2.start_steps=1024: .* 1000 timesteps'):
    noise_paths.check_nested(noise_paths.DDPMPath(), 1024)
  noise_paths.check_nested(noise_paths.DDPMPath(interpolate=True), 1024)
  noise_paths.check_nested(noise_paths.COSINE, 4096)


def test_ddpm_training_times_are_table_entries():
  path = noise_paths.DDPMPath(num_timesteps=50)
  t = np.asarray(path.sample_t(jax.random.PRNGKey(0), 4096))
  k = np.asarray(path._k(t))  # pylint: disable=protected-access
  np.testing.assert_allclose(t * 50, k, atol=1e-4)
  assert set(k.astype(int)) == set(range(1, 51))


def test_bad_conventions_are_refused():
  with pytest.raises(ValueError, match=r"output='score'"):
    denoiser.Denoiser(lambda *a, **k: None, output='score')
  with pytest.raises(ValueError, match=r"layout='CHWN'"):
    denoiser.Denoiser(lambda *a, **k: None, layout='CHWN')
  with pytest.raises(ValueError, match='EDM noise path'):
    denoiser.Denoiser(lambda *a, **k: None, output='edm')
  with pytest.raises(ValueError, match="betas='quadratic'"):
    noise_paths.DDPMPath(betas='quadratic')
  with pytest.raises(ValueError, match='kind=.vp.'):
    noise_paths.from_dict({'kind': 'vp'})


def test_paths_round_trip_through_their_description():
  for path in (noise_paths.COSINE, noise_paths.DDPMPath(betas='scaled_linear', beta_start=8.5e-4,
                                                        beta_end=0.012),
               noise_paths.FlowPath(shift=3.0, time_input_kind='data_fraction'),
               noise_paths.EDMPath(sigma_data=0.25)):
    assert noise_paths.from_dict(path.describe()) == path


def test_the_gdistill_unet_is_one_implementation(tiny_nets):
  """for_gdistill_net: x_hat of the U-Net's v output at lambda, null label K."""
  from gd_testlib import perturb_params  # pylint: disable=g-import-not-at-top
  from gdistill import diffusion  # pylint: disable=g-import-not-at-top
  k = tiny_nets['num_classes']
  net = denoiser.for_gdistill_net(tiny_nets['base'], mean_type='v', num_classes=k)
  params = perturb_params(tiny_nets['fresh'], seed=3)
  z = jax.random.normal(jax.random.PRNGKey(0), (4, *tiny_nets['shape']))
  lam = jnp.asarray([-3.0, 0.0, 2.0, 5.0])
  label = jnp.asarray([0, 1, 2, k], jnp.int32)
  v = tiny_nets['base'].apply({'params': params}, z, lam, label)
  got = net.x_hat(params, z, t=jnp.zeros(4), logsnr=lam, cond=label)
  np.testing.assert_array_equal(got, diffusion.x_from_v(z_t=z, v=v, logsnr=lam))
  assert net == denoiser.for_gdistill_net(tiny_nets['base'], mean_type='v', num_classes=k)


def test_guided_teacher_clipped_the_authors_way_clips_each_branch_not_the_guided_x_hat():
  """guided_clip='branches': the conditional and unconditional x_hat clipped, x_hat^w not;
  'guided' (the default): x_hat^w clipped. Both against the sampler written out by hand."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from gdistill import compiled_samplers, diffusion, samplers  # pylint: disable=g-import-not-at-top
  base = denoiser.Denoiser(NETS['v_cosine'].apply_fn, output='v', null_cond=GM.k)
  label = jnp.arange(B, dtype=jnp.int32) % GM.k
  z_1 = jax.random.normal(jax.random.PRNGKey(4), (B, *GM.shape))
  w = 4.0

  def by_hand(clip_branches):
    def denoise(z, t):
      lam = jnp.broadcast_to(base.path.logsnr(t), (B,))
      cond, uncond = GM.x_hat(z, lam, label), GM.x_hat(z, lam, jnp.full_like(label, GM.k))
      if clip_branches:
        cond, uncond = jnp.clip(cond, -1, 1), jnp.clip(uncond, -1, 1)
      return diffusion.guided(cond=cond, uncond=uncond, w=jnp.full((B,), w))
    return samplers.ddim_sample(denoise, z_1, num_steps=4, clip=not clip_branches)

  got = {}
  for clip in ('guided', 'branches'):
    net = dataclasses.replace(base, guided_clip=clip)
    fn = compiled_samplers.make_sample_fn(net, mode='guided', sampler='ddim')
    got[clip] = np.asarray(fn(None, label, jnp.float32(w), z_1, jnp.int32(4),
                              jax.random.PRNGKey(0)))
    np.testing.assert_allclose(got[clip], np.asarray(by_hand(clip == 'branches')), atol=1e-5)
    assert net.sampler_clips('student') and net.sampler_clips('guided') == (clip == 'guided')
  assert np.abs(got['guided'] - got['branches']).max() > 0.05  # at w = 4 the choice matters
  assert 'guided_clip' not in base.describe()  # earlier checkpoint metas stay equal
  assert dataclasses.replace(base, guided_clip='branches').describe()['guided_clip'] == 'branches'
  with pytest.raises(ValueError, match="guided_clip='x'"):
    dataclasses.replace(base, guided_clip='x')
