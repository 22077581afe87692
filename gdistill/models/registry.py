"""What a network is: each architecture's builder, named sizes and config keys.

``config.model`` holds one architecture's keyword arguments: ``arch`` names it
('unet' when absent: every config and checkpoint made before DiTs existed), and the
other keys are those ``Arch.keys`` lists, passed to ``Arch.build`` as overrides of the
named ``size``. The U-Net and the DiT take the same call,
``net(z, logsnr, label, w=None, *, train=False)``, so nothing past ``networks`` asks
which one it has.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from gdistill.models import dit, unet

DEFAULT_ARCH = 'unet'


@dataclasses.dataclass(frozen=True)
class Arch:
  """One architecture.

  Attributes:
    build: ``build(*, size, num_classes, out_ch, use_w, dtype, remat, **overrides)``
      -> a Flax module with the U-Net's call signature.
    sizes: named sizes, each a dict of keyword arguments ``build`` takes.
    keys: the ``config.model`` keys it takes, besides ``arch``.
  """
  build: Callable
  sizes: Mapping[str, dict]
  keys: tuple


# Shared by both: size (a name from ``sizes``), dropout, w_relative, w_embedding,
# w_warmup_steps (read by the stage-1 loss, not the network: networks.TRAINING_KEYS),
# remat. The U-Net's only: attn_head_dim, resblock_resample.
ARCHS = {
    'unet': Arch(unet.build_unet, unet.SIZES,
                 ('size', 'ch', 'ch_mult', 'num_res_blocks', 'attn_resolutions', 'dropout',
                  'w_relative', 'w_embedding', 'w_warmup_steps', 'attn_head_dim',
                  'resblock_resample', 'remat')),
    'dit': Arch(dit.build_dit, dit.SIZES,
                ('size', 'patch_size', 'hidden_size', 'depth', 'num_heads', 'mlp_ratio',
                 'dropout', 'w_relative', 'w_embedding', 'w_warmup_steps', 'remat')),
}


def arch_name(model_section) -> str:
  """``model.arch`` of a config's model section (a ConfigDict or dict)."""
  return model_section.get('arch', DEFAULT_ARCH)


def get(name: str) -> Arch:
  if name not in ARCHS:
    raise ValueError(f'model.arch={name!r}: expected one of {tuple(sorted(ARCHS))}')
  return ARCHS[name]
