"""What today's configs compute, on fixed inputs: the losses with their gradients, the
stage-1 and stage-2 targets, the encoder target and every compiled sampler, with a tiny
U-Net whose weights are all perturbed.

``test_protocol_golden.py`` runs this module twice on the same machine: with the code
before the denoiser protocol (main at ``GOLDEN_COMMIT``, unpacked from the history), which
is the same as

  git worktree add /tmp/base GOLDEN_COMMIT
  cd /tmp/base && PYTHONPATH=/tmp/base:$REPO/tests python -m protocol_golden OUT.npz

and with today's code in the test's own process, and asserts bit equality. (``__main__``
sets the 8 fake CPU devices of ``tests/conftest.py``: XLA's CPU thread split, and so the
float32 roundoff, depends on the device count, as it depends on the machine's CPU.)
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

GOLDEN_COMMIT = 'c19b2e8'
K = 3
SHAPE = (8, 8, 1)
B = 4


def _perturb(params, seed, scale=0.1):
  gen = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(np.asarray(p) + scale * gen.standard_normal(p.shape), jnp.float32),
      params)


def _nets():
  from gdistill.models.unet import build_unet
  from gdistill.networks import init_params
  teacher = build_unet(size='tiny', num_classes=K, out_ch=SHAPE[-1])
  student = build_unet(size='tiny', num_classes=K, out_ch=SHAPE[-1], use_w=True, w_relative=True)
  tp = _perturb(init_params(teacher, jax.random.PRNGKey(0), SHAPE), 1)
  sp = _perturb(init_params(student, jax.random.PRNGKey(1), SHAPE), 2)
  return teacher, student, tp, sp


class _Api:
  """The calls below in either API: before the denoiser protocol (networks as apply_fn,
  mean_type, num_classes) and after it (networks as ``Denoiser``s)."""

  def __init__(self, teacher, student):
    import inspect  # pylint: disable=g-import-not-at-top
    from gdistill import losses  # pylint: disable=g-import-not-at-top
    # Not an import of gdistill.denoiser: an editable install would find today's.
    self.new = 'net' in inspect.signature(losses.teacher_loss).parameters
    if not self.new:
      self.t = dict(apply_fn=teacher.apply, mean_type='v')
      self.s = dict(apply_fn=student.apply, mean_type='v')
    else:
      from gdistill import denoiser  # pylint: disable=g-import-not-at-top
      self.tn = denoiser.for_gdistill_net(teacher, mean_type='v', num_classes=K)
      self.sn = denoiser.for_gdistill_net(student, mean_type='v', num_classes=K)

  def teacher_loss(self):
    from gdistill import losses
    net = dict(net=self.tn) if self.new else dict(self.t, num_classes=K)
    return functools.partial(losses.teacher_loss, p_uncond=0.3, weighting='snr_trunc', **net)

  def stage1_loss(self):
    from gdistill import losses
    nets = (dict(student=self.sn, teacher=self.tn) if self.new else
            dict(self.s, teacher_apply=self.t['apply_fn'], teacher_mean_type='v', num_classes=K))
    return functools.partial(losses.stage1_loss, w_min=0.0, w_max=4.0, weighting='snr_trunc',
                             w_balance=True, w_min_frac=0.25, **nets)

  def student(self):
    return dict(student=self.sn) if self.new else self.s

  def sample_fn(self, mode, sampler):
    from gdistill import compiled_samplers
    if self.new:
      return compiled_samplers.make_sample_fn(self.sn if mode == 'student' else self.tn,
                                              mode=mode, sampler=sampler)
    net = self.s if mode == 'student' else self.t
    return compiled_samplers.make_sample_fn(num_classes=K, mode=mode, sampler=sampler, **net)

  def student_denoise(self, params, label, w):
    from gdistill.guidance import conditional_denoise_fn
    if self.new:
      return conditional_denoise_fn(self.sn, params=params, cond=label, w=w)
    return conditional_denoise_fn(params=params, label=label, w=w, **self.s)


def compute() -> dict:
  """The arrays, keyed by what they are."""
  from gdistill import encoder, losses, samplers
  teacher, student, tp, sp = _nets()
  api = _Api(teacher, student)
  gen = np.random.default_rng(3)
  batch = {'image': jnp.asarray(np.clip(gen.standard_normal((B, *SHAPE)), -1, 1), jnp.float32),
           'label': jnp.asarray(gen.integers(0, K, B), jnp.int32)}
  rng = jax.random.PRNGKey(4)
  out = {}

  def loss_and_grad(name, loss, params, frozen):
    (value, _), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, frozen, batch, rng)
    out[f'{name}/loss'] = np.asarray(value)
    # Every gradient leaf's first values and its sum of squares: bit-equal or not, small.
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
      g = np.asarray(g).ravel()
      out[f'{name}/grad/{jax.tree_util.keystr(path)}'] = np.append(g[:8], np.sum(g * g))

  loss_and_grad('teacher', api.teacher_loss(), tp, {})
  loss_and_grad('stage1', api.stage1_loss(), sp, {'params': tp})
  for grid in ('deterministic', 'both'):
    for n in (1, 4):
      loss_and_grad(f'stage2_{grid}_n{n}', functools.partial(
          losses.stage2_loss, w_min=0.0, w_max=4.0, grid=grid, weighting='snr_plus_one',
          w_balance=True, **api.student()),
          sp, {'params': sp, 'num_steps': jnp.int32(n)})
  for clean in (True, False):
    loss_and_grad(f'encoder_clean{int(clean)}', functools.partial(
        encoder.encoder_distill_loss, encode_w=0.5, grid='both', weighting='snr_trunc',
        **api.student()),
        sp, {'params': sp, 'num_steps': jnp.int32(4), 'clean_start': jnp.bool_(clean)})

  label = batch['label']
  z_1 = jnp.asarray(gen.standard_normal((B, *SHAPE)), jnp.float32)
  for mode, params in (('guided', tp), ('student', sp), ('conditional', tp)):
    for sampler in ('ddim', 'stochastic'):
      fn = api.sample_fn(mode, sampler)
      for n in (1, 3, 8):
        out[f'sample/{mode}/{sampler}/n{n}'] = np.asarray(
            fn(params, label, jnp.float32(1.5), z_1, jnp.int32(n), jax.random.PRNGKey(5)))
  enc = jax.jit(lambda x, n, clean: samplers.ddim_encode(
      api.student_denoise(sp, label, 0.5), x, num_steps=n, clean_start=clean))
  for n in (1, 4):
    for clean in (True, False):
      out[f'encode/n{n}/clean{int(clean)}'] = np.asarray(
          enc(batch['image'], jnp.int32(n), jnp.bool_(clean)))
  t = jnp.asarray([1.0, 0.5, 0.25, 0.125], jnp.float32)
  x_fn = lambda z, s: jnp.tanh(z * (1.0 + s.reshape(-1, 1, 1, 1)))
  s2 = jax.jit(lambda z, t, n: losses.stage2_target(x_fn, z_t=z, t=t, student_steps=n))
  en = jax.jit(lambda z, s, n: encoder.encoder_target(x_fn, z_s=z, s=s, student_steps=n,
                                                      clean_start=True))
  for n in (1, 2, 8):
    out[f'stage2_target/n{n}'] = np.asarray(s2(z_1, t, jnp.int32(n)))
    out[f'encoder_target/n{n}'] = np.asarray(en(z_1, t * 0.5, jnp.int32(n)))
  return out


if __name__ == '__main__':
  import os  # pylint: disable=g-import-not-at-top
  # Before JAX starts its backends (lazily, at the first computation).
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                             + ' --xla_force_host_platform_device_count=8')
  assert len(jax.devices()) == 8
  np.savez_compressed(sys.argv[1], **compute())
