"""Device mesh and sharding rules, chosen by config.

Strategies:
  * ``replicated``: parameters, optimiser state and EMA on every device; the
    batch is split along the ``data`` axis (plain data parallelism).
  * ``fsdp``: parameters, optimiser state and EMA are additionally split along
    the ``data`` axis, each array on its largest dimension that the axis size
    divides (arrays smaller than ``min_fsdp_size`` stay replicated).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
STRATEGIES = ('replicated', 'fsdp')
MIN_FSDP_SIZE = 2 ** 12


def make_mesh(axes: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh with named axes; one size may be -1 to take the remaining devices.

  Axes are ``Auto``: explicit-sharding axes break ``nn.Embed`` on a sharded batch.
  """
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(axes)
  if DATA_AXIS not in names:
    raise ValueError(f'mesh: expected a {DATA_AXIS!r} axis, got axes {names}')
  sizes = [int(axes[n]) for n in names]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh={dict(axes)}: at most one axis may be -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'mesh={dict(axes)}: {len(devices)} devices are not divisible by {known}')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f'mesh={dict(axes)}: needs {math.prod(sizes)} devices, '
                     f'{len(devices)} are available')
  return Mesh(np.array(devices).reshape(sizes), names,
              axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], axis_size: int, *, min_size: int = MIN_FSDP_SIZE) -> P:
  """PartitionSpec of one array under FSDP: its largest dimension divisible by
  ``axis_size`` (the last one on ties: output channels of kernels) is split."""
  if axis_size == 1 or not shape or math.prod(shape) < min_size:
    return P()
  best = None
  for dim, n in enumerate(shape):
    if n % axis_size == 0 and (best is None or n >= shape[best]):
      best = dim
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = DATA_AXIS
  return P(*spec)


def state_shardings(abstract_state, mesh: Mesh, strategy: str):
  """A pytree of NamedShardings matching ``abstract_state`` (from jax.eval_shape)."""
  if strategy not in STRATEGIES:
    raise ValueError(f'sharding={strategy!r}: expected one of {STRATEGIES}')
  size = mesh.shape[DATA_AXIS]

  def rule(leaf):
    if strategy == 'replicated':
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, fsdp_spec(leaf.shape, size))
  return jax.tree.map(rule, abstract_state)
