"""Compiled samplers for networks: the bridge from parameters to images.

``gdistill.samplers`` holds the samplers' maths over a ``denoise_fn``; this module
binds them to a network's ``apply_fn`` and compiles them. One jitted function per
(network, sampler kind); the step count, labels, w and noise are arguments, so a
sweep over step counts and w reuses one compilation. Batches larger than one call
go through ``run_batched``.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from gdistill import consistency, guidance, methods, samplers, sharding as sharding_lib
from gdistill import xla_options


def make_sample_fn(net, *, mode: str, sampler: str, codec=None):
  """Returns jitted ``fn(params, label [B], w [], z_1 [B,H,W,C], num_steps [], rng) -> x``.

  Args:
    net: the ``gdistill.denoiser.Denoiser`` (its noise path gives the sampler's times, its
      ``clip_x`` whether x_hat is clipped, ``guided_clip`` where the guided teacher's is);
      ``label`` is its condition (any pytree).
    mode: ``guided`` (teacher, 2 network evaluations per step), ``student``
      (w-conditioned network, 1 per step), ``conditional`` (teacher without
      guidance, w ignored, 1 per step) or ``consistency`` (a consistency student's
      function, ``gdistill.consistency``, 1 per step).
    sampler: ``ddim``, ``stochastic`` or ``consistency`` (multistep consistency sampling;
      the one sampler of mode ``consistency``).
    codec: a ``gdistill.codec`` that is not the identity: ``params`` is then the pair
      (network params, codec params) and the samples come out decoded to images, clipped
      to [-1, 1] (``WithCodec`` passes the pair).
  """
  if mode not in methods.NFE_PER_STEP:
    raise ValueError(f'mode={mode!r}: expected one of {tuple(methods.NFE_PER_STEP)}')
  if (mode == 'consistency') != (sampler == 'consistency'):
    raise ValueError(f'mode={mode!r} with sampler={sampler!r}: a consistency student samples '
                     f'with the consistency sampler, and only it')

  def sample(params, label, w, z_1, num_steps, rng):
    if mode == 'guided':
      denoise = guidance.guided_teacher_denoise_fn(net, params=params, cond=label, w=w)
    elif mode == 'consistency':
      denoise = consistency.consistency_fn(net, params=params, cond=label, w=w)
    else:
      denoise = guidance.conditional_denoise_fn(net, params=params, cond=label,
                                                w=w if mode == 'student' else None)
    return samplers.sample(sampler, denoise, z_1, num_steps=num_steps, rng=rng,
                           clip=net.sampler_clips(mode), path=net.path)
  if codec is None:
    return jax.jit(sample)

  @jax.jit
  def decoded(params, label, w, z_1, num_steps, rng):
    net_params, codec_params = params
    z_0 = sample(net_params, label, w, z_1, num_steps, rng)
    return jnp.clip(codec.decode_with(codec_params, z_0), -1.0, 1.0)
  return decoded


class WithCodec:
  """A compiled sampler of a latent run called as a pixel run's: ``fn(params, ...)``
  passes ``(params, codec_params)`` to the sampler ``make_sample_fn(..., codec=)`` made."""

  def __init__(self, fn, codec_params):
    self.fn, self.codec_params = fn, codec_params

  def __call__(self, params, *args):
    return self.fn((params, self.codec_params), *args)


class AotSampler:
  """A jitted sampler compiled ahead of time (``.lower(...).compile()``) once
  per input signature (shapes, dtypes, shardings), with the compile time
  reported through ``log``. The step count is an argument, so one compilation
  serves every N. ``compile_options``: ``xla_options.compile_options``."""

  def __init__(self, jitted, *, name: str, log=None, compile_options=None):
    self.jitted, self.name, self.log = jitted, name, log
    self.compile_options = compile_options or {}
    self.compiled = {}

  @staticmethod
  def _signature(args):
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((tuple(np.shape(x)), str(getattr(x, 'dtype', type(x))),
                           getattr(x, 'weak_type', False), getattr(x, 'sharding', None))
                          for x in leaves)

  def __call__(self, *args):
    key = self._signature(args)
    if key not in self.compiled:
      t0 = time.perf_counter()
      self.compiled[key] = xla_options.compile(self.jitted.lower(*args), self.compile_options)
      if self.log is not None:
        self.log(f'compiled the {self.name} sampler in {time.perf_counter() - t0:.1f}s '
                 f'(batch {np.shape(args[1])[0]}; every step count)')
    return self.compiled[key](*args)


def nfe_per_step(mode: str) -> int:
  """Network evaluations per sampling step (``methods.NFE_PER_STEP``)."""
  return methods.NFE_PER_STEP[mode]


def class_grid(sample_fn, params, *, num_classes: int, per_class: int, image_shape, w: float,
               num_steps: int, seed: int, sharding=None) -> np.ndarray:
  """Samples ``per_class`` images of every class: [K, per_class, H, W, C] in [-1, 1].

  ``image_shape``: of the noise (the sampler's space; ``sample_fn`` may decode it)."""
  label = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), per_class)
  rng = jax.random.PRNGKey(seed)
  z_1 = jax.random.normal(jax.random.fold_in(rng, 0), (label.shape[0], *image_shape))
  args = (jnp.float32(w), jnp.int32(num_steps), jax.random.fold_in(rng, 1))
  if sharding is not None:
    # Every input lives on the mesh (with several processes a jitted call
    # cannot mix process-local and global arrays); a batch that does not
    # split over the devices is replicated.
    repl = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    batch_sh = sharding if label.shape[0] % sharding.mesh.size == 0 else repl
    label, z_1 = jax.device_put(label, batch_sh), jax.device_put(z_1, batch_sh)
    args = jax.device_put(args, repl)
  w_arr, steps_arr, sample_rng = args
  x = sample_fn(params, label, w_arr, z_1, steps_arr, sample_rng)
  if not x.is_fully_addressable:  # rows on other processes' devices: gather them here
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x)).reshape(num_classes, per_class, *x.shape[1:])


def to_host(x) -> np.ndarray:
  """A (possibly multi-process) array as numpy on every process."""
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run_batched(fn: Callable, arrays: Sequence[np.ndarray], *, batch_size: int,
                mesh) -> np.ndarray:
  """``fn(chunk_index, *chunks)`` over the leading axis; results concatenated.

  Every chunk is padded to one size (a multiple of the mesh's devices), so a
  jitted ``fn`` compiles once; chunks are split over the data axis.
  """
  n = int(arrays[0].shape[0])
  devices = mesh.size
  size = max(devices, -(-min(batch_size, n) // devices) * devices)
  batch_sh = sharding_lib.batch_sharding(mesh)
  out = []
  for k, start in enumerate(range(0, n, size)):
    chunk = [np.asarray(a[start:start + size]) for a in arrays]
    m = chunk[0].shape[0]
    if m < size:  # pad with copies of the last row; cut off below
      chunk = [np.concatenate([c, np.repeat(c[-1:], size - m, axis=0)]) for c in chunk]
    # The same host values on every process: device_put assembles the global array.
    chunk = [jax.device_put(c, batch_sh) for c in chunk]
    out.append(to_host(fn(k, *chunk))[:m])
  return np.concatenate(out)
