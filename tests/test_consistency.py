"""Guided consistency distillation (gdistill/consistency.py) and the methods registry.

The maths with a tiny U-Net whose weights are all perturbed: the boundary condition
holds exactly, the target is the samplers' own guided DDIM step (checked against an
independent float64 computation of the guided x_hat and the DDIM formula), and the loss
compares the student's output with the EMA target network's at that point. The run (its
report rows, grids and training cost) is tests/test_methods_run.py's; slow: killed with SIGKILL after its first checkpoint and resumed, it ends with exactly the
uninterrupted run's parameters.
"""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smoke_workdir
from gd_testlib import perturb_params
from gdistill import (checkpoint, consistency, diffusion, guidance, losses, methods, run_plan,
                      samplers, storage)
from gdistill.config_base import base_config
from gdistill.denoiser import from_apply
from gdistill.eval import plan, report
from gdistill.networks import init_params, make_net

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 4


@pytest.fixture(scope='module')
def nets(tiny_nets):
  teacher = from_apply(tiny_nets['base'].apply, mean_type='v', num_classes=10)
  student = from_apply(tiny_nets['with_w'].apply, mean_type='v', num_classes=10, takes_w=True)
  return dict(teacher=teacher, student=student, shape=tiny_nets['shape'],
              teacher_params=perturb_params(tiny_nets['fresh'], 1),
              student_params=perturb_params(tiny_nets['fresh_w'], 2),
              target_params=perturb_params(tiny_nets['fresh_w'], 3))


def _inputs(shape, seed=0):
  g = np.random.default_rng(seed)
  z = jnp.asarray(g.standard_normal((B, *shape)), jnp.float32)
  label = jnp.asarray(g.integers(0, 10, B), jnp.int32)
  w = jnp.asarray([0.0, 0.5, 1.5, 4.0], jnp.float32)
  return z, label, w


def test_boundary_condition_holds_exactly(nets):
  z, label, w = _inputs(nets['shape'])
  f = consistency.consistency_fn(nets['student'], params=nets['student_params'], cond=label,
                                 w=w)
  at_zero = jax.jit(f)(z, jnp.zeros((B,), jnp.float32))
  np.testing.assert_array_equal(np.asarray(at_zero), np.asarray(z))  # f(z, 0) = z, bitwise
  # Away from the boundary the network's x_hat is the output (c_skip ~1e-5 from 1/64).
  x_fn = guidance.conditional_denoise_fn(nets['student'], params=nets['student_params'],
                                         cond=label, w=w)
  t = jnp.full((B,), 1.0 / 64)
  np.testing.assert_allclose(f(z, t), x_fn(z, t), atol=1e-4 * float(jnp.abs(z).max()) + 1e-5)
  assert float(consistency.c_skip(0.0)) == 1.0 and float(consistency.c_skip(1 / 64)) < 1.1e-5


def _guided_ddim64(nets, z, label, w, t_hi, t_lo):
  """One guided DDIM step in float64 from the two branches' x_hat (clipped guided x_hat)."""
  net, p = nets['teacher'], nets['teacher_params']
  lam_hi, lam_lo = net.path.logsnr(t_hi), net.path.logsnr(t_lo)
  x_c = np.float64(net.x_hat(p, z, t=t_hi, logsnr=lam_hi, cond=label))
  x_u = np.float64(net.x_hat(p, z, t=t_hi, logsnr=lam_hi, cond=jnp.full((B,), 10, jnp.int32),
                             raw_cond=True))
  wb = np.float64(w)[:, None, None, None]
  x = np.clip((1 + wb) * x_c - wb * x_u, -1.0, 1.0)
  a_hi, s_hi = (np.float64(v)[:, None, None, None] for v in diffusion.alpha_sigma(lam_hi))
  a_lo, s_lo = (np.float64(v)[:, None, None, None] for v in diffusion.alpha_sigma(lam_lo))
  return a_lo * x + s_lo * (np.float64(z) - a_hi * x) / s_hi


def test_target_is_the_samplers_guided_ddim_step(nets):
  z, label, w = _inputs(nets['shape'], 1)
  t_hi = jnp.asarray([1.0, 0.5, 10 / 64, 2 / 64], jnp.float32)
  t_lo = t_hi - 2 / 64
  solver = guidance.guided_teacher_denoise_fn(nets['teacher'], params=nets['teacher_params'],
                                              cond=label, w=w)
  z_lo = consistency.solver_step(solver, z, t_hi, t_lo, clip=True, path=nets['teacher'].path)
  want = _guided_ddim64(nets, z, label, w, t_hi, t_lo)
  np.testing.assert_allclose(np.float64(z_lo), want, rtol=1e-5, atol=1e-5)
  # The sampler's own first step: ddim_sample from t = 1 over 32 steps takes the same step.
  one = samplers.ddim_update(solver, z, 1.0, 31 / 32, clip=True, path=nets['teacher'].path)[0]
  np.testing.assert_allclose(np.float64(one[:1]),
                             _guided_ddim64(nets, z, label, w, jnp.ones((B,)),
                                            jnp.full((B,), 31 / 32))[:1], rtol=1e-5, atol=1e-5)
  # The target: the EMA network's consistency function at that point; at t_lo = 0 the
  # point itself (the boundary condition).
  target_fn = consistency.consistency_fn(nets['student'], params=nets['target_params'],
                                         cond=label, w=w)
  got = consistency.consistency_target(solver_fn=solver, target_fn=target_fn, z_hi=z,
                                       t_hi=t_hi, t_lo=t_lo, clip=True,
                                       path=nets['teacher'].path)
  np.testing.assert_allclose(got, target_fn(z_lo, t_lo), rtol=1e-6, atol=1e-6)
  at_zero = consistency.consistency_target(
      solver_fn=solver, target_fn=target_fn, z_hi=z, t_hi=jnp.full((B,), 2 / 64),
      t_lo=jnp.zeros((B,)), clip=True, path=nets['teacher'].path)
  np.testing.assert_allclose(np.float64(at_zero),
                             _guided_ddim64(nets, z, label, w, jnp.full((B,), 2 / 64),
                                            jnp.zeros((B,))), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('solver', ['stage1', 'teacher'])
def test_loss_compares_output_with_the_target_networks(nets, solver):
  """The loss is the distance between f_theta at t_{n+k} and the target network's f at
  the solver's step; equal parameters for both give a different loss than theta- = 0."""
  shape = nets['shape']
  g = np.random.default_rng(4)
  batch = {'image': jnp.asarray(g.uniform(-1, 1, (B, *shape)), jnp.float32),
           'label': jnp.asarray(g.integers(0, 10, B), jnp.int32)}
  frozen = {'params': nets['teacher_params'] if solver == 'teacher'
            else nets['student_params']}
  kw = dict(student=nets['student'], solver=solver, teacher=nets['teacher'], w_min=0.0,
            w_max=4.0, grid_steps=8, skip=2, distance='l2')
  loss = lambda tp: consistency.consistency_loss(nets['student_params'], frozen, batch,
                                                 jax.random.PRNGKey(0), target_params=tp,
                                                 **kw)[0]
  # Reproduce it from its parts: the same draws as the loss makes.
  t_rng, eps_rng, w_rng, _ = jax.random.split(jax.random.PRNGKey(0), 4)
  t_hi, t_lo = consistency.grid_times(t_rng, B, grid_steps=8, skip=2)
  assert set(np.round(np.asarray(t_hi - t_lo) * 8, 5)) == {2.0}
  w = losses.uniform_w(w_rng, B, 0.0, 4.0)
  eps = jax.random.normal(eps_rng, batch['image'].shape)
  z = diffusion.diffuse(x=batch['image'], eps=eps, logsnr=nets['student'].path.logsnr(t_hi))
  if solver == 'teacher':
    solve = guidance.guided_teacher_denoise_fn(nets['teacher'], params=frozen['params'],
                                               cond=batch['label'], w=w)
  else:
    solve = guidance.conditional_denoise_fn(nets['student'], params=frozen['params'],
                                            cond=batch['label'], w=w)
  z_lo = consistency.solver_step(solve, z, t_hi, t_lo, clip=True, path=nets['student'].path)
  f = lambda p, zz, tt: consistency.consistency_fn(nets['student'], params=p,
                                                   cond=batch['label'], w=w)(zz, tt)
  want = jnp.mean(jnp.square(f(nets['student_params'], z, t_hi)
                             - f(nets['target_params'], z_lo, t_lo)))
  np.testing.assert_allclose(loss(nets['target_params']), want, rtol=1e-5)
  assert abs(float(loss(nets['student_params'])) - float(want)) > 1e-6


def test_registry_owns_modes_nfe_and_names():
  assert methods.nfe('guided', 8) == 16 and methods.nfe('consistency', 8) == 8
  assert plan.Setting('consistency', 4, 'consistency', 1.0, 'consistency').nfe == 4
  assert plan.Setting('teacher_ddim', 4, 'ddim', 1.0, 'teacher').mode == 'guided'
  assert run_plan.parse_phase_name('consistency') == ('consistency', None)
  assert run_plan.parse_phase_name('stage2_n0004') == ('stage2', 4)
  c = base_config()
  c.stages = ('stage1', 'consistency', 'eval')
  c.consistency.sample_steps = (1, 2, 4, 8)
  p = run_plan.from_config(c)
  spec = p['consistency']
  assert spec.teacher == 'stage1' and spec.serves == tuple(('consistency', n) for n in (1, 2, 4, 8))
  assert [s.name for s in p.training(c.stages, external_teacher=True)] == ['stage1', 'consistency']
  c.stages = ('stage1', 'stage2')
  assert 'consistency' not in run_plan.from_config(c)  # existing configs: the plan as before
  settings = plan.build_plan(w_values=(0.0, 1.0), models=plan.MODELS, teacher_steps=(64,),
                             teacher_ddim_steps=(), students=[spec], samplers=('ddim',))
  assert {(s.model, s.steps, s.sampler) for s in settings if s.model == 'consistency'} == {
      ('consistency', n, 'consistency') for n in (1, 2, 4, 8)}


def test_report_sets_methods_side_by_side():
  row = lambda m, s, n, fid: {'model': m, 'sampler': s, 'steps': n, 'nfe': n, 'w': 0.0,
                              'fid': fid, 'is': 1.0, 'precision': 0.5, 'recall': 0.5}
  rows = [row('student', 'ddim', 4, 8.0), row('consistency', 'consistency', 4, 7.0),
          row('student', 'ddim', 1, 30.0), row('consistency', 'consistency', 1, 40.0),
          row('consistency', 'consistency', 2, 12.0)]
  costs = {'stage2_n0004': {'steps': 300, 'images': 19200, 'seconds': 600.0},
           'consistency': {'steps': 1150, 'images': 73600, 'seconds': 1500.0}}
  training = report.training_costs(costs, {'stage2_n0004': 'stage2', 'consistency':
                                           'consistency'})
  rep = report.build(protocol={}, floor={}, rows=rows, training=training)
  by_nfe = {c['nfe']: c['better'] for c in rep['methods']}
  assert by_nfe == {1: 'progressive distillation', 4: 'consistency distillation'}  # 2: one method
  assert rep['training']['consistency distillation']['minutes'] == 25.0
  assert not report.claims(rows)  # consistency rows are not the paper's students
  # A report of one method (every existing config) has no comparison and no training key.
  assert set(report.build(protocol={}, floor={}, rows=rows[:1])) == {
      'protocol', 'floor', 'claims', 'rows'}


# ---- the run: SIGKILL and resume ---------------------------------------------------------

RUN_TIMEOUT_S = 3600


def _command(workdir, data_dir, stages):
  # The sweep samples the consistency rows only (the teacher's rows are the eval tests').
  return [sys.executable, '-m', 'gdistill.main', '--config=configs/smoke.py',
          f'--workdir={workdir}', f'--config.stages={stages}',
          f'--config.data.data_dir={data_dir}', "--config.eval.models=('consistency',)"]


def _final(workdir):
  """The consistency phase's latest sampling parameters (numpy) and its saved steps."""
  d = checkpoint.phase_dir(workdir, 'consistency')
  steps = sorted(int(s) for s in storage.listdir(d) if s.isdigit())
  spec = importlib.util.spec_from_file_location('smoke_cfg', os.path.join(REPO, 'configs',
                                                                          'smoke.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  net = make_net(module.get_config(), num_classes=10, out_ch=1, use_w=True)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.eval_shape(lambda r: init_params(net, r, (28, 28, 1)), jax.random.PRNGKey(0))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                          abstract)
  params, _ = checkpoint.load_eval_params(d, abstract)
  return jax.device_get(params), steps


@pytest.fixture(scope='module')
def base_workdir(tmp_path_factory, fashion_data_dir):
  """Teacher and stage 1 of the smoke config, trained once."""
  path = str(tmp_path_factory.mktemp('consistency') / 'base')
  proc = subprocess.run(_command(path, fashion_data_dir, "('teacher','stage1')"), cwd=REPO,
                        env=smoke_workdir.subprocess_env(), capture_output=True, text=True,
                        timeout=RUN_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return path


@pytest.fixture(scope='module')
def ref_workdir(base_workdir, fashion_data_dir, tmp_path_factory):
  """An uninterrupted consistency run (with the sweep) on a copy of the base workdir."""
  ref = str(tmp_path_factory.mktemp('consistency_ref') / 'ref')
  shutil.copytree(base_workdir, ref)
  proc = subprocess.run(_command(ref, fashion_data_dir, "('stage1','consistency','eval')"),
                        cwd=REPO, env=smoke_workdir.subprocess_env(), capture_output=True,
                        text=True, timeout=RUN_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return ref


# Slow (two more runs; CI time): the fast suite kills and resumes stage 1 (test_pipeline).
@pytest.mark.slow
def test_consistency_phase_resumes_bit_exactly_after_sigkill(base_workdir, ref_workdir,
                                                             fashion_data_dir, tmp_path):
  env = smoke_workdir.subprocess_env()
  killed = str(tmp_path / 'killed')
  shutil.copytree(base_workdir, killed)
  stages = "('stage1','consistency')"  # the resumed run's parameters are what is compared
  p = subprocess.Popen(_command(killed, fashion_data_dir, stages), cwd=REPO, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  d = checkpoint.phase_dir(killed, 'consistency')
  deadline = time.monotonic() + RUN_TIMEOUT_S
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    while not (storage.isdir(os.path.join(d, '2'))
               and ocp.utils.is_checkpoint_finalized(os.path.join(d, '2'))):
      assert p.poll() is None and time.monotonic() < deadline, 'ended before step 2'
      time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
  finally:
    if p.poll() is None:
      p.kill()
    p.wait()
  assert p.returncode == -signal.SIGKILL
  steps = sorted(int(s) for s in storage.listdir(d) if s.isdigit())
  assert steps[-1] < 4, f'killed too late ({steps})'
  proc = subprocess.run(_command(killed, fashion_data_dir, stages), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'consistency: resumed from step 2' in proc.stdout, proc.stdout[-3000:]
  (want, _), (have, _) = _final(ref_workdir), _final(killed)
  jax.tree.map(np.testing.assert_array_equal, have, want)
