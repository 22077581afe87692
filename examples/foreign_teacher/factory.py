"""gdistill's side of the foreign teacher: the one function a user writes.

``make_teacher(config)`` loads the DiT of ``model.py`` (another codebase's conventions:
NCHW, integer timesteps 0..999 on a linear-beta DDPM table, eps-prediction, null label
0 and classes 1..10) from its one-file weights, and declares those conventions to
gdistill. Distil it with the stock pipeline:

  python -m gdistill.main --config=examples/foreign_teacher/config.py --workdir=runs/foreign
"""

from __future__ import annotations

import json
import os

import flax.serialization

from examples.foreign_teacher import model as dit
from gdistill import noise_paths
from gdistill.denoiser import Denoiser
from gdistill.teacher_source import ForeignTeacher

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, 'weights', 'fmnist_dit.msgpack')


def _plus_one(label):
  """gdistill's labels 0..9 -> this network's classes 1..10 (0 is its null label)."""
  return label + 1


def make_teacher(config) -> ForeignTeacher:
  weights = config.get('foreign_weights', '') or WEIGHTS
  with open(os.path.splitext(weights)[0] + '.json') as f:
    info = json.load(f)
  with open(weights, 'rb') as f:  # Flax msgpack: arrays only, never pickle
    variables = flax.serialization.msgpack_restore(f.read())
  module = dit.DiT(**info['model_kwargs'])

  def apply_fn(params, z, timestep, y, *, train=False, rngs=None):
    # train=False always: in training mode this DiT drops labels itself (its own label
    # dropout), which a distillation target must not see.
    del train, rngs
    return module.apply({'params': params}, z, timestep, y, train=False)

  net = Denoiser(apply_fn, output='eps',
                 path=noise_paths.DDPMPath(betas='linear', num_timesteps=dit.NUM_TIMESTEPS,
                                           beta_start=dit.BETA_START, beta_end=dit.BETA_END),
                 null_cond=dit.NULL_LABEL, layout='NCHW', clip_x=True, label_to_cond=_plus_one)
  return ForeignTeacher(net=net, params=variables['params'], image_shape=(28, 28, 1),
                        num_classes=10, w_hook='TimestepEmbedder_0',
                        description={'weights': os.path.relpath(weights, HERE),
                                     'architecture': info['model_kwargs']})
