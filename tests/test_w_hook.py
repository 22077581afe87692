"""The w input added to a network that has none: the fresh student equals the conditional
teacher (linen and nnx), and w moves the output once the embedding is trained."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gd_testlib import perturb_params
from gdistill import w_hook

B, D = 4, 16


class TimeEmbedder(nn.Module):
  @nn.compact
  def __call__(self, t):
    f = t.astype(jnp.float32)[:, None] * jnp.arange(1, 9, dtype=jnp.float32)[None]
    return nn.Dense(D, name='mlp')(jnp.concatenate([jnp.sin(f), jnp.cos(f)], -1))


class ForeignNet(nn.Module):
  """Another codebase's conventions: NCHW, integer timesteps, its own names."""
  @nn.compact
  def __call__(self, x, t, y, train=False):
    c = TimeEmbedder(name='t_embedder')(t / 1000.0) + nn.Embed(11, D, name='y_embedder')(y)
    h = nn.Conv(D, (3, 3), name='stem')(jnp.transpose(x, (0, 2, 3, 1)))
    h = nn.gelu(h + c[:, None, None, :])
    out = nn.Conv(x.shape[1], (3, 3), name='head')(h)
    return jnp.transpose(out, (0, 3, 1, 2))


def _teacher_apply(params, z, time, cond, *, train=False, rngs=None):
  del rngs
  return ForeignNet().apply({'params': params}, z, time, cond, train=train)


def _inputs():
  z = jax.random.normal(jax.random.PRNGKey(1), (B, 1, 8, 8))
  return z, jnp.asarray([10, 250, 600, 999], jnp.int32), jnp.asarray([0, 3, 7, 10], jnp.int32)


def test_linen_hook_fresh_student_equals_conditional_teacher():
  z, t, y = _inputs()
  params = perturb_params(ForeignNet().init(jax.random.PRNGKey(0), z, t, y)['params'], seed=2)
  shape = w_hook.embedding_shape(lambda p: _teacher_apply(p, z, t, y), params, 't_embedder')
  assert shape == (B, D)
  student_params = w_hook.student_params(params, w_hook.init_w_params(D, jax.random.PRNGKey(3)))
  student = jax.jit(w_hook.hook_linen(_teacher_apply, 't_embedder'))
  want = _teacher_apply(params, z, t, y)
  for w in (0.0, 1.0, 4.0):
    got = student(student_params, z, t, y, w=jnp.full((B,), w))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # Once the embedding's last layer is not zero, w reaches the output.
  trained = dict(student_params, **{w_hook.W_PARAMS: perturb_params(
      student_params[w_hook.W_PARAMS], seed=4)})
  a = student(trained, z, t, y, w=jnp.zeros((B,)))
  b = student(trained, z, t, y, w=jnp.full((B,), 2.0))
  assert np.abs(np.asarray(a - b)).max() > 1e-3


def test_linen_hook_names_a_missing_submodule():
  z, t, y = _inputs()
  params = ForeignNet().init(jax.random.PRNGKey(0), z, t, y)['params']
  with pytest.raises(ValueError, match=r"w_hook='time_embed'.*t_embedder"):
    w_hook.embedding_shape(lambda p: _teacher_apply(p, z, t, y), params, 'time_embed')


def test_nnx_hook_fresh_student_equals_conditional_teacher():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class NnxNet(nnx.Module):
    def __init__(self, rngs):
      self.t_embedder = nnx.Linear(1, D, rngs=rngs)
      self.y_embedder = nnx.Embed(11, D, rngs=rngs)
      self.head = nnx.Linear(D, 64, rngs=rngs)

    def __call__(self, z, t, y):
      c = self.t_embedder(t.astype(jnp.float32)[:, None] / 1000.0) + self.y_embedder(y)
      return z + self.head(nnx.gelu(c)).reshape(z.shape)

  z, t, y = _inputs()
  teacher = NnxNet(nnx.Rngs(0))
  teacher_apply, teacher_state = w_hook.nnx_apply(teacher)
  want = teacher_apply(teacher_state, z, t, y)
  student = NnxNet(nnx.Rngs(0))
  w_hook.hook_nnx(student, 't_embedder', out_dim=D, rngs=nnx.Rngs(5))
  student_apply, student_state = w_hook.nnx_apply(student, hook_path='t_embedder')
  student_apply = jax.jit(student_apply)
  for w in (0.0, 1.0, 4.0):
    got = student_apply(student_state, z, t, y, w=jnp.full((B,), w))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="no submodule 'time'"):
    w_hook.hook_nnx(NnxNet(nnx.Rngs(0)), 'time', out_dim=D, rngs=nnx.Rngs(5))
