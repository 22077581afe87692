"""The student's guidance weight for a network that has no w input.

Stage 1 needs a student x_hat(z_t, c, w). A teacher brought from another codebase has
no w input, so gdistill adds one the way the paper adds it to its U-Net: Fourier
features of w through an MLP whose last layer is zero-initialised, added to the output
of the network's time-embedding submodule (named by its path, e.g. ``t_embedder``).
The fresh student therefore computes exactly the conditional teacher, and stage 1
starts from every one of the teacher's weights.

  * Flax linen: ``flax.linen.intercept_methods`` adds the embedding to the named
    submodule's ``__call__`` output; the student's parameters are the teacher's plus
    ``{W_PARAMS: ...}``.
  * Flax nnx: ``hook_nnx`` replaces the named submodule in place by a module that calls
    the original and adds the embedding (``nnx_apply`` makes it a pure apply function).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from gdistill.models.unet import add_guidance_weight, sinusoidal_embedding

W_PARAMS = 'gdistill_w_embedding'  # the hook's entry in the student's parameters


class WEmbedding(nn.Module):
  """The w branch of gdistill's own networks (``unet.add_guidance_weight``) on its own:
  Fourier(w_embed_scale w) -> Dense -> swish -> zero-initialised Dense(out_dim)."""
  out_dim: int
  features: int = 64
  w_embed_scale: float = 250.0

  @nn.compact
  def __call__(self, w):
    return add_guidance_weight(jnp.zeros((w.shape[0], self.out_dim), jnp.float32), w,
                               use_w=True, net='w hook', features=self.features,
                               scale=self.w_embed_scale, relative=False)


def _target_path(target: str) -> tuple:
  return tuple(p for p in target.replace('.', '/').split('/') if p)


def _add(out, emb):
  """The [B, D] embedding added to a [B, ..., D] submodule output."""
  emb = emb.reshape(emb.shape[:1] + (1,) * (out.ndim - 2) + emb.shape[-1:])
  return out + emb.astype(out.dtype)


def embedding_shape(call: Callable, params, target: str) -> tuple:
  """Output shape of the linen submodule at ``target`` when ``call(params)`` runs the
  network (no computation: ``jax.eval_shape``). ValueError if no such submodule runs."""
  path, seen, paths = _target_path(target), [], set()

  def record(next_fun, args, kw, context):
    out = next_fun(*args, **kw)
    if context.method_name == '__call__':
      paths.add('/'.join(context.module.path))
      if tuple(context.module.path) == path:
        seen.append(jax.tree.leaves(out)[0].shape)
    return out

  def recorded(p):
    with nn.intercept_methods(record):
      return call(p)
  jax.eval_shape(recorded, params)
  if not seen:
    found = ', '.join(sorted(p for p in paths if p)[:12])
    raise ValueError(f'teacher.w_hook={target!r}: no submodule of that path is called '
                     f'(the network calls: {found} ...); expected the time-embedding submodule')
  return seen[0]


def hook_linen(apply_fn: Callable, target: str, *, features: int = 64,
               w_embed_scale: float = 250.0) -> Callable:
  """A student apply function ``(params, z, time, cond, *, w, train, rngs)`` from a
  teacher's ``(params, z, time, cond, *, train, rngs)``: the embedding of w (whose
  parameters are ``params[W_PARAMS]``) is added to the output of submodule ``target``."""
  path = _target_path(target)

  def student_apply(params, z, time, cond, *, w, train=False, rngs=None):
    params = dict(params)
    w_params = params.pop(W_PARAMS)
    out_dim = w_params['w_dense1']['bias'].shape[-1]
    emb = WEmbedding(out_dim, features, w_embed_scale).apply({'params': w_params}, w)

    def add_w(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == '__call__' and tuple(context.module.path) == path:
        out = _add(out, emb)
      return out

    with nn.intercept_methods(add_w):
      return apply_fn(params, z, time, cond, train=train, rngs=rngs)
  return student_apply


def init_w_params(out_dim: int, rng, *, features: int = 64, w_embed_scale: float = 250.0):
  """Fresh parameters of the w embedding (its last layer zero: it adds nothing)."""
  return WEmbedding(out_dim, features, w_embed_scale).init(rng, jnp.zeros((1,)))['params']


def student_params(teacher_params, w_params) -> dict:
  """The teacher's parameters with the w embedding's beside them."""
  if W_PARAMS in teacher_params:
    raise ValueError(f'the teacher already has a parameter collection named {W_PARAMS!r}')
  return dict(teacher_params, **{W_PARAMS: w_params})


# ---- Flax nnx ------------------------------------------------------------------------------

def _nnx():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx


def hook_nnx(model, target: str, *, out_dim: int, rngs, features: int = 64,
             w_embed_scale: float = 250.0):
  """Replaces ``model.<target>`` in place by the original plus the w embedding; returns
  the hook, whose ``w`` (an nnx Variable) the caller sets before each call."""
  nnx = _nnx()

  class WInput(nnx.Variable):
    pass

  class WHooked(nnx.Module):
    def __init__(self, inner):
      self.inner = inner
      self.dense0 = nnx.Linear(features, out_dim, rngs=rngs)
      self.dense1 = nnx.Linear(out_dim, out_dim, kernel_init=nnx.initializers.zeros, rngs=rngs)
      self.w = WInput(jnp.zeros((1,), jnp.float32))

    def __call__(self, *args, **kwargs):
      out = self.inner(*args, **kwargs)
      h = sinusoidal_embedding(w_embed_scale * self.w.get_value(), features)
      return _add(out, self.dense1(nnx.swish(self.dense0(h))))

  *parents, name = _target_path(target)
  owner = model
  for p in parents:
    owner = getattr(owner, p)
  if not hasattr(owner, name):
    raise ValueError(f'teacher.w_hook={target!r}: the model has no submodule {name!r} there')
  hooked = WHooked(getattr(owner, name))
  setattr(owner, name, hooked)
  return hooked


def nnx_apply(model, *, hook_path: str = '', call: Callable = None):
  """(apply_fn, params) of an nnx model: ``apply_fn(params, z, time, cond, *, train, rngs
  [, w])`` merges the graph with ``params`` (its whole state) and calls
  ``call(module, z, time, cond)`` (default: ``module(z, time, cond)``); with a hook at
  ``hook_path`` the ``w`` argument is fed to it."""
  nnx = _nnx()
  graphdef, state = nnx.split(model)
  call = call or (lambda m, z, time, cond: m(z, time, cond))

  def apply_fn(params, z, time, cond, *, train=False, rngs=None, w=None):
    del train, rngs
    module = nnx.merge(graphdef, params)
    if w is not None:
      hook = module
      for p in _target_path(hook_path):
        hook = getattr(hook, p)
      hook.w.set_value(w)
    return call(module, z, time, cond)
  return apply_fn, state
