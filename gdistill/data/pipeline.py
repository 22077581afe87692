"""The training input pipeline: Grain from an ImageSource to sharded global batches.

Global batch ``s`` holds positions ``[s * B, (s + 1) * B)`` of an endless stream
that visits the split once per epoch, epoch ``e`` in the order of Grain's global
``shuffle`` (seeded ``shuffle_seed(seed) + e``); a batch may straddle two epochs.
So the batches are a pure function of ``(seed, step)``, and the iterator's whole
state is the step: the phase's checkpoint holds it (the train state's ``step``),
and a run resumed at step ``s`` starts the stream at batch ``s``, seeing exactly
the batches it would have seen uninterrupted, on any number of processes and
with any number of worker processes.

Each process reads, decodes and normalises only the rows of each global batch
that its own devices hold, in ``num_workers`` worker processes (0: in this
process), a few batches ahead of the loop on a reader thread; the loop asks for
batch ``s + 1`` (placed on its devices) while step ``s`` runs.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec

from gdistill.data.sources import ImageSource

# Batches each reader (the thread, or each worker process) keeps ready.
PREFETCH_BATCHES = 2
# num_workers=AUTO_WORKERS: one worker process per this many usable cores, at most
# MAX_AUTO_WORKERS (none on 2 cores: a worker would take a core from the steps, and
# the reader thread alone keeps pace there; benchmarks/loop.py measures it).
AUTO_WORKERS = -1
CORES_PER_WORKER = 4
MAX_AUTO_WORKERS = 8


def shuffle_seed(seed: int) -> int:
  """Grain's shuffle seed for data seed ``seed``.

  Grain seeds epoch ``e`` with ``shuffle_seed + e``; mixing the seed keeps epoch
  ``e + 1`` of seed ``s`` from being epoch ``e`` of seed ``s + 1``.
  """
  return int(np.random.SeedSequence(int(seed)).generate_state(1)[0])


def num_workers(requested: int) -> int:
  """Worker processes for ``requested`` (``AUTO_WORKERS``: from the usable cores)."""
  if requested != AUTO_WORKERS:
    return requested
  try:
    cores = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):  # not on Linux
    cores = os.cpu_count() or 1
  return min(MAX_AUTO_WORKERS, cores // CORES_PER_WORKER)


def to_model_input(batch_uint8: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Converts ``{'image': uint8, 'label': int}`` to model inputs.

  Args:
    batch_uint8: ``image`` uint8 ``[n, H, W, C]`` and ``label`` ``[n]`` (a latent run's
      float latents pass through: ``gdistill.data.latents``).

  Returns:
    ``{'image': float32 in [-1, 1], 'label': int32}``.
  """
  image = batch_uint8['image']
  if image.dtype == np.uint8:
    image = np.asarray(image, np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
  else:
    image = np.asarray(image, np.float32)
  return {'image': image, 'label': np.asarray(batch_uint8['label'], np.int32)}


def local_batches(source: ImageSource, *, seed: int, batch_size: int,
                  rows: slice) -> grain.MapDataset:
  """This process's part of every global batch, as a Grain dataset.

  Args:
    source: The examples.
    seed: Data order seed.
    batch_size: Global batch size ``B``.
    rows: The rows of each global batch this process holds: a block of ``n``
      rows starting at a multiple of ``n``, ``n`` dividing ``B``.

  Returns:
    An endless ``MapDataset`` whose element ``s`` is rows ``rows`` of global
    batch ``s``: ``{'image': float32 [n, H, W, C] in [-1, 1], 'label': int32
    [n]}``.

  Raises:
    ValueError: If ``rows`` is not such a block.
  """
  n = rows.stop - rows.start
  if n <= 0 or batch_size % n or rows.start % n:
    raise ValueError(f'Rows {rows.start}:{rows.stop} of a batch of {batch_size} are not'
                     ' one of equal blocks; give every process as many devices.')
  stream = source.examples().shuffle(seed=shuffle_seed(seed)).repeat()
  # Blocks of n positions; global batch s is blocks s * B/n ... (s + 1) * B/n - 1.
  return stream.batch(n)[rows.start // n::batch_size // n].map(to_model_input)


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


def train_batches(source: ImageSource, *, seed: int, batch_size: int,
                  sharding: NamedSharding, start: int, stop: int,
                  workers: int = 0) -> Iterator[dict[str, jax.Array]]:
  """Global batches ``start, ..., stop - 1`` as sharded ``jax.Array``s.

  Every process reads and converts only the rows its own devices hold and
  assembles the global arrays with ``jax.make_array_from_process_local_data``.
  Close the iterator (or let it go) to stop its reader and workers.

  Args:
    source: The examples.
    seed: Data order seed.
    batch_size: Global batch size; divisible by the process count.
    sharding: Sharding of the images ``[batch_size, H, W, C]``; the labels use
      the same mesh with only the batch axis of its PartitionSpec.
    start: First global step (the position to resume from).
    stop: Step after the last.
    workers: Worker processes reading and decoding (0: in this process).

  Returns:
    An iterator of ``{'image': float32 [batch_size, H, W, C] in [-1, 1],
    'label': int32 [batch_size]}``.

  Raises:
    ValueError: If ``batch_size`` is not divisible by the process count.
  """
  num_processes = jax.process_count()
  if batch_size % num_processes:
    raise ValueError(f'batch_size={batch_size} is not divisible by the'
                     f' process count {num_processes}.')
  image_shape = (batch_size, *source.image_shape)
  rows = _local_rows(sharding, image_shape, batch_size)
  label_sharding = _label_sharding(sharding)
  dataset = local_batches(source, seed=seed, batch_size=batch_size, rows=rows)[start:stop]
  dataset = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=PREFETCH_BATCHES))
  if workers:
    if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers,
                                     per_worker_buffer_size=PREFETCH_BATCHES),
        worker_init_fn=_leave_stop_signals_to_the_trainer)
  return _on_devices(iter(dataset), sharding, label_sharding, image_shape)


def _leave_stop_signals_to_the_trainer(worker: int, count: int) -> None:
  """A worker ignores SIGINT and SIGTERM: a Ctrl-C reaches the whole process group, and
  the trainer, which stops cleanly on them (``gdistill.preemption``), still needs the
  batches of the step in flight; closing the iterator stops the workers."""
  del worker, count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _on_devices(iterator: grain.DatasetIterator, sharding: NamedSharding,
                label_sharding: NamedSharding,
                image_shape: tuple[int, ...]) -> Iterator[dict[str, jax.Array]]:
  """The local batches of ``iterator`` as global arrays; closes it when closed."""
  try:
    for local in iterator:
      yield {
          'image': jax.make_array_from_process_local_data(
              sharding, local['image'], image_shape),
          'label': jax.make_array_from_process_local_data(
              label_sharding, local['label'], image_shape[:1]),
      }
  finally:
    iterator.close()
