"""The training objectives, checked against independent computations.

The stage-2 target is checked with the exact denoiser of Gaussian data and a
float64 re-implementation of METHOD.md section 4; the stage-1 target and the
student initialisation with a tiny U-Net whose weights are all perturbed (a
fresh U-Net predicts exactly 0, which would hide any mistake).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gd_testlib import GaussianData, perturb_params
from gdistill import diffusion, losses
from gdistill.denoiser import from_apply
from gdistill.networks import student_from_teacher

# ---- float64 reference of METHOD.md sections 1 and 4 -------------------------------


def _logsnr64(t):
  b = np.arctan(np.exp(-10.0))
  a = np.arctan(np.exp(10.0)) - b
  return -2.0 * np.log(np.tan(a * np.asarray(t, np.float64) + b))


def _alpha_sigma64(t):
  lam = _logsnr64(t)
  return np.sqrt(1.0 / (1.0 + np.exp(-lam))), np.sqrt(1.0 / (1.0 + np.exp(lam)))


def _x_hat64(data, z, t):
  alpha, sigma = (v[:, None, None, None] for v in _alpha_sigma64(t))
  gain = alpha * data.s**2 / (alpha**2 * data.s**2 + sigma**2)
  return data.mu + gain * (z - alpha * data.mu)


def _ddim64(z, x, t, s):
  a_t, s_t = (v[:, None, None, None] for v in _alpha_sigma64(t))
  a_s, s_s = (v[:, None, None, None] for v in _alpha_sigma64(s))
  return a_s * x + s_s * (z - a_t * x) / s_t


def _two_teacher_steps64(data, z_t, t, n):
  """x1, z_t', x2, z_t'' of METHOD.md section 4, step 3 (teacher steps of 1/(2N))."""
  t1, t2 = np.maximum(t - 0.5 / n, 0.0), np.maximum(t - 1.0 / n, 0.0)
  x1 = _x_hat64(data, z_t, t)
  z1 = _ddim64(z_t, x1, t, t1)
  x2 = _x_hat64(data, z1, t1)
  z2 = _ddim64(z1, x2, t1, t2)
  return x1, z1, x2, z2


# ---- stage 2 -------------------------------------------------------------------------

_B = 256  # one batch size for every N: one compilation of the target
_stage2_target = jax.jit(lambda z_t, t, n: losses.stage2_target(
    GaussianData(mu=0.3, s=0.5).denoise_fn, z_t=z_t, t=t, student_steps=n))


@pytest.mark.parametrize('n', [1, 2, 4, 16, 128])
def test_stage2_target_one_student_step_equals_two_teacher_steps(n):
  """For every t = i / (2N) (the 'both' grid, which contains the 'deterministic' one)."""
  data = GaussianData(mu=0.3, s=0.5)
  t = (np.arange(_B) % (2 * n) + 1) / (2.0 * n)  # [B], every grid point
  z_t = np.random.default_rng(n).standard_normal((_B, 3, 3, 2)) * 1.2
  x_tilde = np.asarray(_stage2_target(jnp.asarray(z_t, jnp.float32), jnp.asarray(t, jnp.float32),
                                      jnp.int32(n)), np.float64)
  assert np.all(np.isfinite(x_tilde))
  x1, _, x2, z2 = _two_teacher_steps64(data, z_t, t, n)
  t2 = np.maximum(t - 1.0 / n, 0.0)
  inner = t2 > 0
  # One student DDIM step from t to t'' with x_tilde lands on the teacher's z_t''.
  z_student = _ddim64(z_t, x_tilde, t, t2)
  assert inner.any() == (n > 1)
  if inner.any():
    np.testing.assert_allclose(z_student[inner], z2[inner], rtol=2e-4, atol=2e-4)
    # And x_tilde is the formula of METHOD.md section 4, step 4.
    a_t, s_t = (v[:, None, None, None] for v in _alpha_sigma64(t))
    a_u, s_u = (v[:, None, None, None] for v in _alpha_sigma64(t2))
    want = (z2 - (s_u / s_t) * z_t) / (a_u - (s_u / s_t) * a_t)
    denom = np.abs(a_u - (s_u / s_t) * a_t)[inner].min()
    np.testing.assert_allclose(x_tilde[inner], want[inner], atol=1e-5 / denom)
  # The last student step (t'' = 0, t = 1/N): the target is the teacher's x2 ...
  last = np.isclose(t, 1.0 / n)
  np.testing.assert_allclose(x_tilde[last], x2[last], rtol=1e-4, atol=1e-5)
  # ... and a student step to t'' = 0 with it still lands on the teacher's z_0.
  np.testing.assert_allclose(z_student[last], z2[last], atol=1e-3)
  # Where already t' = 0 (t = 1/(2N)): the teacher's first prediction x1 (a second
  # teacher call at t' = 0 would return about the same: x_hat(z_0) = z_0 = x1).
  first = np.isclose(t, 0.5 / n)
  np.testing.assert_allclose(x_tilde[first], x1[first], rtol=1e-4, atol=1e-5)


def test_stage2_target_is_not_one_teacher_step():
  """Guards the test above against a degenerate denoiser: two steps of 1/(2N)
  differ from one step of 1/N, so x_tilde differs from the teacher's x1."""
  data, n = GaussianData(mu=0.3, s=0.5), 2
  t = np.where(np.arange(_B) % 2, 1.0, 0.75)
  z_t = np.random.default_rng(0).standard_normal((_B, 3, 3, 2))
  x_tilde = np.asarray(_stage2_target(jnp.asarray(z_t, jnp.float32), jnp.asarray(t, jnp.float32),
                                      jnp.int32(n)))
  x1 = _x_hat64(data, z_t, t)
  assert np.abs(x_tilde - x1).max() > 1e-3


_time_grid = {grid: jax.jit(functools.partial(losses.stage2_time_grid, batch=4096, grid=grid))
              for grid in ('deterministic', 'both')}


@pytest.mark.parametrize('grid,denom', [('deterministic', 1), ('both', 2)])
@pytest.mark.parametrize('n', [1, 4, 32])
def test_stage2_time_grid_on_grid_and_covers_it(grid, denom, n):
  for steps in (n, jnp.int32(n)):  # a Python int, and an array as in stage2_loss
    t = np.asarray(_time_grid[grid](jax.random.PRNGKey(n), student_steps=steps), np.float64)
    i = t * denom * n
    np.testing.assert_allclose(i, np.round(i), atol=1e-4)
    assert set(np.round(i).astype(int)) == set(range(1, denom * n + 1))


def test_stage2_time_grid_rejects_unknown_grid():
  with pytest.raises(ValueError, match='time_grid'):
    losses.stage2_time_grid(jax.random.PRNGKey(0), 4, student_steps=2, grid='odd')


class _Recorder:
  """A stand-in network ``apply_fn``: records every call's inputs, returns
  ``out_fn(params, z, logsnr, label, w)``. Works under jit: the recorded arrays
  are returned as outputs of the jitted function by ``_run_jitted``."""

  def __init__(self, out_fn):
    self.out_fn, self.static, self.traced = out_fn, [], []

  def __call__(self, variables, z, logsnr, label, train=False, rngs=None, w=None):
    params = variables['params']
    self.static.append(dict(params=params if isinstance(params, str) else None, train=train,
                            has_w=w is not None))
    self.traced.append(dict(z=z, logsnr=logsnr, label=label, **({} if w is None else {'w': w})))
    return self.out_fn(params, z, logsnr, label, w)


def _run_jitted(loss_thunk, *recorders):
  """Runs ``loss_thunk() -> (loss, aux)`` compiled (eager ops cost a compilation
  each); returns the loss and, per recorder, its calls with numpy arrays."""
  loss, traced = jax.jit(lambda: (loss_thunk()[0], [r.traced for r in recorders]))()
  calls = []
  for r, tr in zip(recorders, traced):
    calls.append([dict(st, **jax.tree.map(np.asarray, t)) for st, t in zip(r.static, tr)])
  return float(loss), calls


def test_stage2_loss_queries_teacher_twice_with_same_label_and_w():
  data = GaussianData()
  rec = _Recorder(lambda params, z, logsnr, label, w: data.x_hat(z, logsnr))
  b, n = 64, 4
  batch = {'image': jnp.zeros((b, 2, 2, 1)), 'label': jnp.arange(b, dtype=jnp.int32) % 10}
  loss, (calls,) = _run_jitted(lambda: losses.stage2_loss(
      'student', {'params': 'teacher', 'num_steps': jnp.int32(n)}, batch, jax.random.PRNGKey(0),
      student=from_apply(rec, mean_type='x', num_classes=10), w_min=1.0, w_max=3.0,
      grid='deterministic',
      weighting='snr_trunc'), rec)
  assert np.isfinite(loss)
  assert [c['params'] for c in calls] == ['teacher', 'teacher', 'student']
  assert [c['train'] for c in calls] == [False, False, True]
  for c in calls:
    np.testing.assert_array_equal(c['label'], batch['label'])
    np.testing.assert_array_equal(c['w'], calls[0]['w'])
  assert 1.0 <= calls[0]['w'].min() and calls[0]['w'].max() <= 3.0
  assert calls[0]['w'].std() > 0.3  # drawn per example
  assert calls[0]['logsnr'].shape == (b,)
  np.testing.assert_array_equal(calls[2]['logsnr'], calls[0]['logsnr'])  # student at t
  np.testing.assert_array_equal(calls[2]['z'], calls[0]['z'])
  # t on the student's grid i / N, and the second teacher call at t' = t - 1/(2N).
  grid = np.arange(1, n + 1) / n
  idx = np.argmin(np.abs(_logsnr64(grid)[None, :] - calls[0]['logsnr'][:, None]), axis=1)
  np.testing.assert_allclose(calls[0]['logsnr'], _logsnr64(grid[idx]), rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(calls[1]['logsnr'], _logsnr64(grid[idx] - 0.5 / n), rtol=1e-4,
                             atol=1e-3)
  assert len(set(idx)) == n


# ---- teacher loss -------------------------------------------------------------------

def _zero_net(params, z, logsnr, label, w):
  return jnp.zeros_like(z)


@pytest.mark.parametrize('p_uncond', [0.0, 0.2])
def test_teacher_loss_drops_label_at_rate_p_uncond(p_uncond):
  rec = _Recorder(_zero_net)
  b, k = 40_000, 10
  label = jnp.asarray(np.random.default_rng(0).integers(0, k, b), jnp.int32)
  batch = {'image': jnp.zeros((b, 1, 1, 1)), 'label': label}
  _, ((call,),) = _run_jitted(lambda: losses.teacher_loss(
      {}, {}, batch, jax.random.PRNGKey(1), net=from_apply(rec, mean_type='x', num_classes=k),
      p_uncond=p_uncond, weighting='snr_trunc'), rec)
  seen = call['label']
  dropped = seen != np.asarray(label)
  assert np.all(seen[dropped] == k)  # dropped labels become the null label, K
  assert call['train'] and not call['has_w']
  # Binomial(40000, p): 5 standard deviations is at most 0.01.
  assert abs(dropped.mean() - p_uncond) < 0.01
  if p_uncond:
    assert dropped.sum() > 0


def test_teacher_loss_is_weighted_x_error():
  """A network predicting x_hat = 0 has loss E[max(SNR, 1) mean(x^2)]."""
  b = 20_000
  rec = _Recorder(_zero_net)
  batch = {'image': jnp.full((b, 1, 1, 1), 0.5), 'label': jnp.zeros((b,), jnp.int32)}
  loss, ((call,),) = _run_jitted(lambda: losses.teacher_loss(
      {}, {}, batch, jax.random.PRNGKey(2), net=from_apply(rec, mean_type='x', num_classes=10),
      p_uncond=0.1, weighting='snr_trunc'), rec)
  lam = call['logsnr']
  np.testing.assert_allclose(loss, np.mean(np.maximum(np.exp(lam), 1.0) * 0.25), rtol=1e-5)
  # t ~ U[0, 1]: logsnr is the schedule at uniform times (compare quartiles).
  t = np.linspace(0.0, 1.0, 5)[1:-1]
  np.testing.assert_allclose(np.quantile(lam, [0.75, 0.5, 0.25]), _logsnr64(t), atol=0.15)
  # z_t = alpha x + sigma eps with eps ~ N(0, 1).
  alpha, sigma = np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))
  eps = (call['z'][:, 0, 0, 0] - alpha * 0.5) / sigma
  assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05


# ---- stage 1 ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def teacher(tiny_nets):
  """A tiny U-Net teacher whose every weight (including the zero-initialised
  output conv) is perturbed, so cond and uncond predictions really differ."""
  params = perturb_params(tiny_nets['fresh'], seed=10)
  k = tiny_nets['num_classes']
  rng = np.random.default_rng(11)
  b = 6
  z = jnp.asarray(rng.standard_normal((b, *tiny_nets['shape'])), jnp.float32)
  logsnr = jnp.asarray(rng.uniform(-6, 6, b), jnp.float32)
  label = jnp.asarray(rng.integers(0, k, b), jnp.int32)
  return dict(tiny_nets, params=params, z=z, logsnr=logsnr, label=label, b=b)


def _x_from_net(apply, params, z, logsnr, label):
  return diffusion.x_from_v(z_t=z, v=apply(params, z, logsnr, label), logsnr=logsnr)


def test_stage1_target_is_guided_teacher(teacher):
  tch = teacher
  k = tch['num_classes']
  cond = _x_from_net(tch['apply'], tch['params'], tch['z'], tch['logsnr'], tch['label'])
  uncond = _x_from_net(tch['apply'], tch['params'], tch['z'], tch['logsnr'],
                       jnp.full_like(tch['label'], k))
  assert np.abs(cond - uncond).max() > 1e-2  # the label matters to this teacher
  target = jax.jit(functools.partial(
      losses.stage1_target, teacher=from_apply(tch['base'].apply, num_classes=k, mean_type='v'),
      t=jnp.zeros((tch['b'],))))
  w0 = target(teacher_params=tch['params'], z_t=tch['z'], logsnr=tch['logsnr'],
              cond=tch['label'], w=jnp.zeros((tch['b'],)))
  np.testing.assert_allclose(w0, cond, rtol=1e-5, atol=1e-5)
  w = jnp.array([0.5, 1.0, 2.0, 3.0, 4.0, 7.5])
  got = target(teacher_params=tch['params'], z_t=tch['z'], logsnr=tch['logsnr'],
               cond=tch['label'], w=w)
  want = (1 + w[:, None, None, None]) * cond - w[:, None, None, None] * uncond
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_student_from_teacher_equals_conditional_teacher(teacher):
  tch = teacher
  student = student_from_teacher(tch['fresh_w'], tch['params'])
  want = tch['apply'](tch['params'], tch['z'], tch['logsnr'], tch['label'])
  assert np.abs(want).max() > 1e-2
  for w in (0.0, 0.7, 4.0, 14.0):
    got = tch['apply_w'](student, tch['z'], tch['logsnr'], tch['label'], jnp.full((tch['b'],), w))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_student_from_teacher_rejects_mismatched_teacher(tiny_nets):
  bigger = dict(tiny_nets['fresh'])
  bigger['conv_in'] = {'kernel': jnp.zeros((3, 3, 1, 17)), 'bias': jnp.zeros((17,))}
  with pytest.raises(ValueError, match='conv_in'):
    student_from_teacher(tiny_nets['fresh_w'], bigger)


def test_stage1_loss_wiring():
  """Stand-in networks: the teacher sees (c, null) for the same z_t and logsnr,
  the student the same z_t, label and a per-example w in [w_min, w_max]; the
  loss is zero exactly when the student predicts the guided combination."""
  b, k = 256, 10
  cond_x = lambda label: 0.1 * label.astype(jnp.float32)  # the teacher: x_hat(c) = 0.1 c
  teacher = _Recorder(lambda params, z, logsnr, label, w: jnp.broadcast_to(
      cond_x(label)[:, None, None, None], z.shape))
  # The student: the guided teacher exactly, plus its "params" (an offset).
  student = _Recorder(lambda params, z, logsnr, label, w: jnp.broadcast_to(
      ((1 + w) * cond_x(label) - w * 0.1 * k + params)[:, None, None, None], z.shape))
  label = jnp.asarray(np.random.default_rng(0).integers(0, k, b), jnp.int32)
  batch = {'image': jnp.zeros((b, 2, 2, 1)), 'label': label}
  kw = dict(student=from_apply(student, mean_type='x', num_classes=k),
            teacher=from_apply(teacher, mean_type='x', num_classes=k), w_min=0.5, w_max=3.0,
            weighting='snr_trunc')
  loss0, ((tc,), (sc,)) = _run_jitted(lambda: losses.stage1_loss(
      0.0, {'params': 'T'}, batch, jax.random.PRNGKey(0), **kw), teacher, student)
  np.testing.assert_array_equal(tc['label'], np.concatenate([label, np.full(b, k)]))
  np.testing.assert_array_equal(tc['z'][:b], tc['z'][b:])
  np.testing.assert_array_equal(tc['logsnr'][:b], tc['logsnr'][b:])
  assert tc['params'] == 'T' and not tc['has_w'] and not tc['train'] and sc['train']
  np.testing.assert_array_equal(sc['z'], tc['z'][:b])
  np.testing.assert_array_equal(sc['logsnr'], tc['logsnr'][:b])
  np.testing.assert_array_equal(sc['label'], label)
  assert 0.5 <= sc['w'].min() and sc['w'].max() <= 3.0 and sc['w'].std() > 0.5
  assert loss0 < 1e-9
  teacher.static, teacher.traced, student.static, student.traced = [], [], [], []
  loss1, _ = _run_jitted(lambda: losses.stage1_loss(
      0.1, {'params': 'T'}, batch, jax.random.PRNGKey(0), **kw), teacher, student)
  weights = np.maximum(np.exp(sc['logsnr']), 1.0)
  np.testing.assert_allclose(loss1, np.mean(weights * 0.01), rtol=1e-4)


@pytest.mark.parametrize('stage', ['stage1', 'stage2'])
@pytest.mark.parametrize('w', [0.0, 1.5, 3.0])
def test_w_balance_divides_each_example_by_one_plus_w_squared(stage, w):
  """With every example at the same w, the balanced loss is the plain one / (1 + w)^2."""
  data, b = GaussianData(), 32
  offset = lambda params: 0.1 if params == 'student' else 0.0
  net = _Recorder(lambda params, z, logsnr, label, w_: data.x_hat(z, logsnr) + offset(params))
  batch = {'image': 0.5 * jnp.ones((b, 2, 2, 1)), 'label': jnp.arange(b, dtype=jnp.int32) % 10}
  if stage == 'stage1':
    fn = functools.partial(losses.stage1_loss, 'student', {'params': 'teacher'}, batch,
                           jax.random.PRNGKey(1), student=from_apply(net, mean_type='x', num_classes=10),
                           teacher=from_apply(net, mean_type='x', num_classes=10))
  else:
    fn = functools.partial(losses.stage2_loss, 'student',
                           {'params': 'teacher', 'num_steps': jnp.int32(4)}, batch,
                           jax.random.PRNGKey(1),
                           student=from_apply(net, mean_type='x', num_classes=10),
                           grid='deterministic')
  kw = dict(w_min=w, w_max=w, weighting='snr_trunc')
  plain, _ = _run_jitted(lambda: fn(**kw, w_balance=False))
  balanced, _ = _run_jitted(lambda: fn(**kw, w_balance=True))
  assert plain > 1e-4
  np.testing.assert_allclose(balanced, plain / (1.0 + w) ** 2, rtol=1e-5)


@pytest.mark.parametrize('frac', [0.0, 0.3])
def test_w_min_frac_trains_that_fraction_at_w_min_and_the_rest_uniform(frac):
  """stage1.w_min_frac: about that fraction of examples at w_min exactly, the rest in
  (w_min, w_max); 0 draws every w uniformly."""
  data, b = GaussianData(), 2048
  net = _Recorder(lambda params, z, logsnr, label, w_: data.x_hat(z, logsnr))
  batch = {'image': jnp.zeros((b, 2, 2, 1)), 'label': jnp.arange(b, dtype=jnp.int32) % 10}
  _, (calls,) = _run_jitted(lambda: losses.stage1_loss(
      'student', {'params': 'teacher'}, batch, jax.random.PRNGKey(3),
      student=from_apply(net, mean_type='x', num_classes=10),
      teacher=from_apply(net, mean_type='x', num_classes=10), w_min=0.5,
      w_max=4.0, weighting='snr_trunc', w_min_frac=frac), net)
  w = [c['w'] for c in calls if c['params'] == 'student'][0]
  at_min = np.mean(w == 0.5)
  assert abs(at_min - frac) < 0.04, at_min
  rest = w[w != 0.5]
  assert rest.min() > 0.5 and rest.max() < 4.0 and abs(rest.mean() - 2.25) < 0.1


@pytest.mark.parametrize('frac', [0.0, 0.3])
def test_stage2_w_min_frac_trains_that_fraction_at_w_min(frac):
  """stage2.w_min_frac: each halving draws w as stage 1 does; the teacher's two steps and
  the student's step see the same w."""
  data, b = GaussianData(), 2048
  net = _Recorder(lambda params, z, logsnr, label, w_: data.x_hat(z, logsnr))
  batch = {'image': jnp.zeros((b, 2, 2, 1)), 'label': jnp.arange(b, dtype=jnp.int32) % 10}
  _, (calls,) = _run_jitted(lambda: losses.stage2_loss(
      'student', {'params': 'teacher', 'num_steps': jnp.int32(4)}, batch,
      jax.random.PRNGKey(3), student=from_apply(net, mean_type='x', num_classes=10),
      w_min=0.5, w_max=4.0, grid='deterministic', weighting='snr_trunc', w_min_frac=frac), net)
  w = calls[-1]['w']
  for c in calls:
    np.testing.assert_array_equal(c['w'], w)
  assert abs(np.mean(w == 0.5) - frac) < 0.04
  rest = w[w != 0.5]
  assert rest.min() > 0.5 and rest.max() < 4.0 and abs(rest.mean() - 2.25) < 0.1
