"""Tiny teachers in another codebase's conventions for ``teacher.source`` tests:
NCHW, integer timesteps on a 1000-entry linear-beta table, eps output, null label 0 and
classes 1..10, its own module names; random weights (the plumbing is what is tested)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from gdistill import noise_paths
from gdistill.denoiser import Denoiser
from gdistill.teacher_source import ForeignTeacher

D = 16


class TimeEmbedder(nn.Module):
  @nn.compact
  def __call__(self, t):
    f = t.astype(jnp.float32)[:, None] / 1000.0 * jnp.arange(1, 9, dtype=jnp.float32)[None]
    return nn.Dense(D, name='mlp')(jnp.concatenate([jnp.sin(f), jnp.cos(f)], -1))


class ForeignNet(nn.Module):
  @nn.compact
  def __call__(self, x, t, y, train=False):
    c = TimeEmbedder(name='t_embedder')(t) + nn.Embed(11, D, name='y_embedder')(y)
    h = nn.Conv(D, (3, 3), name='stem')(jnp.transpose(x, (0, 2, 3, 1)))
    h = nn.gelu(h + c[:, None, None, :])
    out = nn.Conv(x.shape[1], (3, 3), name='head')(h)
    return jnp.transpose(out, (0, 3, 1, 2))


def _plus_one(label):
  return label + 1


def _teacher(path, shape=(28, 28, 1), null=0, out_fn=None):
  module = ForeignNet()
  x = jnp.zeros((1, shape[2], shape[0], shape[1]))
  params = module.init(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32),
                       jnp.zeros((1,), jnp.int32))['params']

  def apply_fn(params, z, t, y, *, train=False, rngs=None):
    del train, rngs
    out = module.apply({'params': params}, z, t, y)
    return out if out_fn is None else out_fn(out)

  net = Denoiser(apply_fn, output='eps', path=path, null_cond=null, layout='NCHW',
                 label_to_cond=_plus_one)
  return ForeignTeacher(net=net, params=params, image_shape=shape, num_classes=10,
                        w_hook='t_embedder')


def make(config):
  del config
  return _teacher(noise_paths.DDPMPath())


def make_sd_like(config):  # Stable Diffusion's table: far from pure noise at t = 1
  del config
  return _teacher(noise_paths.DDPMPath(betas='scaled_linear', beta_start=0.00085,
                                       beta_end=0.012))


def make_wrong_shape(config):
  del config
  return _teacher(noise_paths.DDPMPath(), out_fn=lambda out: out[:, :, :14])


def make_bad_null(config):  # a null label outside the network's embedding table
  del config
  return _teacher(noise_paths.DDPMPath(), null=jnp.zeros((3,), jnp.int32))


def make_not_a_teacher(config):
  del config
  return {'params': {}}
