"""Deterministic, resumable batching of an ImageSource into global jax.Arrays.

The example order is a pure function of ``(seed, step)``: nothing is carried
from step to step, so a run restored at step ``s`` sees exactly the batches
it would have seen without the interruption, on any number of processes.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gdistill.data.sources import ImageSource


@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """Returns the (cached, read-only) example permutation of one epoch."""
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  perm.flags.writeable = False
  return perm


def _check_non_negative(**values: int) -> None:
  """Raises ValueError naming the first argument that is not an int >= 0."""
  for key, value in values.items():
    if int(value) != value or value < 0:
      raise ValueError(f'{key} must be a non-negative integer, got {value!r}.')


def batch_indices(*, seed: int, step: int, batch_size: int,
                  num_examples: int) -> np.ndarray:
  """Returns the example indices of global batch ``step``.

  Epoch ``e`` visits the examples in the order
  ``np.random.default_rng([seed, e]).permutation(num_examples)``; global
  position ``p = step * batch_size + j`` is example ``perm_e[p % num_examples]``
  of epoch ``e = p // num_examples``. A batch may straddle two epochs.

  Args:
    seed: Data order seed (non-negative).
    step: Global step (non-negative).
    batch_size: Global batch size (positive).
    num_examples: Number of examples in the split (positive).

  Returns:
    int64 array ``[batch_size]``.

  Raises:
    ValueError: On negative or zero arguments.
  """
  _check_non_negative(seed=seed, step=step)
  if batch_size <= 0 or num_examples <= 0:
    raise ValueError(f'batch_size ({batch_size}) and num_examples'
                     f' ({num_examples}) must be positive.')
  positions = int(step) * int(batch_size) + np.arange(batch_size,
                                                       dtype=np.int64)
  epochs = positions // num_examples
  offsets = positions % num_examples
  out = np.empty((batch_size,), np.int64)
  for epoch in np.unique(epochs):
    rows = epochs == epoch
    out[rows] = _epoch_permutation(int(seed), int(epoch),
                                   int(num_examples))[offsets[rows]]
  return out


def to_model_input(batch_uint8: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Converts ``{'image': uint8, 'label': int}`` to model inputs.

  Args:
    batch_uint8: ``image`` uint8 ``[n, H, W, C]`` and ``label`` ``[n]``.

  Returns:
    ``{'image': float32 in [-1, 1], 'label': int32}``.
  """
  image = np.asarray(batch_uint8['image'], np.float32) * np.float32(
      2.0 / 255.0) - np.float32(1.0)
  return {'image': image, 'label': np.asarray(batch_uint8['label'], np.int32)}


def _label_sharding(sharding: NamedSharding) -> NamedSharding:
  """Same mesh, partitioned only along the batch (first) axis."""
  spec = sharding.spec
  batch_spec = PartitionSpec(spec[0]) if len(spec) else PartitionSpec()
  return NamedSharding(sharding.mesh, batch_spec)


def _local_rows(sharding: NamedSharding, global_shape: tuple[int, ...],
                batch_size: int) -> slice:
  """Returns the contiguous batch rows held by this process's devices.

  With the usual process-major device order this is the
  ``process_index``-th block of ``batch_size // process_count`` rows.

  Raises:
    ValueError: If this process's rows are not one contiguous block.
  """
  rows = set()
  for index in sharding.addressable_devices_indices_map(global_shape).values():
    rows.update(range(*index[0].indices(batch_size)))
  if not rows:
    raise ValueError(f'Process {jax.process_index()} holds no device of the'
                     f' mesh of {sharding}.')
  start, stop = min(rows), max(rows) + 1
  if len(rows) != stop - start:
    raise ValueError(
        f'The batch rows of process {jax.process_index()} are not contiguous'
        f' under {sharding}; order the mesh devices by process.')
  return slice(start, stop)


def global_batch(source: ImageSource, *, seed: int, step: int, batch_size: int,
                 sharding: NamedSharding) -> dict[str, jax.Array]:
  """Builds global batch ``step`` as sharded ``jax.Array``s.

  Every process computes the same global indices, reads and converts only the
  rows its own devices hold, and assembles the global arrays with
  ``jax.make_array_from_process_local_data``.

  Args:
    source: The examples.
    seed: Data order seed.
    step: Global step.
    batch_size: Global batch size; divisible by the process count.
    sharding: Sharding of the images ``[batch_size, H, W, C]``; the labels use
      the same mesh with only the batch axis of its PartitionSpec.

  Returns:
    ``{'image': float32 [batch_size, H, W, C] in [-1, 1],
    'label': int32 [batch_size]}``.

  Raises:
    ValueError: If ``batch_size`` is not divisible by the process count.
  """
  num_processes = jax.process_count()
  if batch_size % num_processes:
    raise ValueError(f'batch_size={batch_size} is not divisible by the'
                     f' process count {num_processes}.')
  indices = batch_indices(seed=seed, step=step, batch_size=batch_size,
                          num_examples=source.num_examples)
  image_shape = (batch_size, *source.image_shape)
  rows = _local_rows(sharding, image_shape, batch_size)
  local = to_model_input(source.get(indices[rows]))
  return {
      'image': jax.make_array_from_process_local_data(
          sharding, local['image'], image_shape),
      'label': jax.make_array_from_process_local_data(
          _label_sharding(sharding), local['label'], (batch_size,)),
  }
