"""Builds the teacher and student networks from the config, and their init functions.

The network is ``config.model``'s architecture (``models/registry.py``: a U-Net, or a
DiT); everything past this module only calls it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from gdistill.models import registry

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


# Model keys that change how a step computes, not the network: left out of the
# checkpoint meta (like ``precision``), so a checkpoint loads with either value.
COMPUTE_KEYS = ('remat',)
# Model keys the training loss reads, not the network (the stage-1 w warm-up,
# ``models.unet.w_warmup_scale``): left out of the network's arguments and the meta
# (the workdir's config.json records them).
TRAINING_KEYS = ('w_warmup_steps',)
# Network keys added after checkpoints were written, with the value that builds the
# network as before them: at that value left out of the arguments and the meta, so
# earlier checkpoints, workdirs and weights files still match.
ADDED_DEFAULTS = {'w_relative': False, 'w_embedding': 'fourier', 'attn_head_dim': 0,
                  'resblock_resample': False}
# Keys of the w branch: meaningless for a network without one (a teacher).
W_KEYS = ('w_relative', 'w_embedding')


def model_kwargs(config, *, use_w: bool = True) -> dict:
  """The model section as plain keyword arguments (also saved in checkpoint meta), less
  ``COMPUTE_KEYS`` and ``TRAINING_KEYS``; sequences as lists (as JSON reads them back).

  ``arch`` only for architectures other than the U-Net: a U-Net's entry is what it was
  before there was a choice, so its checkpoints, workdirs and weights files still match.
  ``ADDED_DEFAULTS`` keys only where they differ from that default, and the w branch's
  (``W_KEYS``) only with one: a teacher and every model saved before a key existed
  carry no such entry.
  """
  kw = {k: list(v) if isinstance(v, (tuple, list)) else v
        for k, v in config.model.to_dict().items()
        if k not in COMPUTE_KEYS and k not in TRAINING_KEYS}
  if kw.get('arch') == registry.DEFAULT_ARCH:
    del kw['arch']
  for key, default in ADDED_DEFAULTS.items():
    if key in kw and (kw[key] == default or (key in W_KEYS and not use_w)):
      del kw[key]
  return kw


def make_net(config, *, num_classes: int, out_ch: int, use_w: bool, dropout=None) -> nn.Module:
  """The network ``config.model`` describes (``dropout`` overrides its rate)."""
  kw = model_kwargs(config, use_w=use_w)
  arch = registry.get(kw.pop('arch', registry.DEFAULT_ARCH))
  if dropout is not None:
    kw['dropout'] = dropout
  return arch.build(num_classes=num_classes, out_ch=out_ch, use_w=use_w,
                    dtype=COMPUTE_DTYPES[config.precision],
                    remat=bool(config.model.get('remat', False)), **kw)


def init_params(net: nn.Module, rng, image_shape):
  """Parameters of ``net`` for images of ``image_shape`` (H, W, C)."""
  z = jnp.zeros((1, *image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  c = jnp.zeros((1,), jnp.int32)
  kwargs = {'w': jnp.zeros((1,), jnp.float32)} if net.use_w else {}
  return net.init(rng, z, t, c, **kwargs)['params']


def student_from_teacher(student_params, teacher_params):
  """Copies every teacher weight into the student; the w branch keeps its init.

  The w branch's last layer is zero-initialised, so the result computes exactly
  the conditional teacher (with ``w_embedding='authors'`` it is not: the w warm-up,
  scale 0 at the first step, makes it start so).
  """
  flat_s = traverse_util.flatten_dict(student_params)
  flat_t = traverse_util.flatten_dict(teacher_params)
  missing = [k for k in flat_t if k not in flat_s or flat_s[k].shape != flat_t[k].shape]
  if missing:
    raise ValueError(f'student lacks teacher parameters {["/".join(k) for k in missing[:3]]}')
  flat_s.update(flat_t)
  return traverse_util.unflatten_dict(flat_s)


def param_count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
