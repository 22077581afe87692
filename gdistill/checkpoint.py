"""Orbax checkpoints: one manager per training phase under ``workdir/checkpoints``.

Each phase (``teacher``, ``stage1``, ``stage2_n0032``, ...) keeps its own
directory, so a later phase never overwrites an earlier one's final model.
A running phase's checkpoints hold the full train state; a finished phase keeps one
lean checkpoint, its sampling parameters only (``save_final``), unless
``checkpoint.keep_train_state`` asks for the full state (to train it longer later).
Every checkpoint has a JSON ``meta`` item that says what the network is
(architecture, parameterisation, student step count; ``lean`` when it is lean).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from gdistill import storage

CHECKPOINT_DIR = 'checkpoints'


class CheckpointError(ValueError):
  """A checkpoint that is missing or does not fit this config."""


def phase_dir(workdir: str, phase: str) -> str:
  return os.path.join(storage.absolute(workdir), CHECKPOINT_DIR, phase)


_ARRAY_HANDLER = {}


def _single_host_writes_each_array_once() -> None:
  """On one host, Orbax's default replica-parallel save slices every replicated array
  into one piece per local device, on the devices, before writing them all from this
  same process: the same bytes in more pieces, and a slicing computation compiled per
  array shape (447 arrays on 8 CPU devices: 20 s the first time, 3x a later save).
  With several hosts each writes its share, which is what replica-parallel is for."""
  multi_host = jax.process_count() > 1
  if _ARRAY_HANDLER.get('multi_host') != multi_host:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=multi_host),
        override=True)
    _ARRAY_HANDLER['multi_host'] = multi_host


def manager(directory: str, *, max_to_keep: int = 2, create: bool = True) -> ocp.CheckpointManager:
  _single_host_writes_each_array_once()
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(storage.absolute(directory), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)))


def sampling_key(meta: dict) -> str:
  """The train-state field that holds a phase's sampling parameters."""
  return 'ema_params' if meta.get('has_ema') else 'params'


def save_final(mgr: ocp.CheckpointManager, step: int, state, meta: dict, *,
               keep_train_state: bool) -> None:
  """Saves a phase's last step, waits until it is durable, then (lean) deletes the
  phase's other checkpoints: what later phases and sampling read is all that stays."""
  if keep_train_state:
    save(mgr, step, state, meta)
    mgr.wait_until_finished()
    return
  key = sampling_key(meta)
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({key: getattr(state, key)}),
                                          meta=ocp.args.JsonSave(meta | {'lean': True})))
  mgr.wait_until_finished()
  delete_other_steps(mgr, step)


def delete_other_steps(mgr: ocp.CheckpointManager, step: int) -> None:
  """Deletes every checkpoint of the manager's directory but ``step``."""
  for other in mgr.all_steps():
    if other != step:
      mgr.delete(other)


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state):
  """Restores the state at ``step`` with the shardings of ``abstract_state``."""
  out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return out.state


def read_meta(directory: str, step: Optional[int] = None) -> dict:
  mgr = manager(directory, create=False)
  step = mgr.latest_step() if step is None else step
  return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def latest_complete(directory: str) -> Optional[int]:
  """The latest step saved in ``directory``, or None if it holds none."""
  if not storage.isdir(directory):
    return None
  return manager(directory, create=False).latest_step()


def _reason(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:200] if lines else ""}'


def newest_readable(directory: str, load: Callable[[int], Any], steps=None,
                    *, set_aside: bool = False) -> tuple[Optional[int], Any]:
  """``(step, load(step))`` for the newest checkpoint in ``directory`` that loads.

  A checkpoint that fails to load (a truncated or corrupted file) is skipped with a
  warning naming it and the one used instead; with ``set_aside`` (the phase's own
  writer) it is renamed ``broken.STEP.TIME``, kept for inspection but out of the way of
  the steps that will be saved again. A ``CheckpointError`` from ``load`` (the checkpoint
  is readable but does not fit) is raised as it is.

  Returns:
    ``(None, None)`` when ``directory`` holds no checkpoint.
  Raises:
    CheckpointError: every checkpoint there is unreadable (one line naming the directory).
  """
  if steps is None:
    steps = manager(directory, create=False).all_steps() if storage.isdir(directory) else []
  broken = []
  for step in sorted(steps, reverse=True):
    try:
      value = load(step)
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      broken.append((step, e))
      continue
    if broken:
      moved = ''
      if set_aside:
        moved = ' (moved aside as ' + ', '.join(_set_aside(directory, b) for b, _ in broken) + ')'
      logging.warning('checkpoint %s: step %s is unreadable (%s); using step %d instead%s',
                      directory, ', '.join(str(b) for b, _ in broken), _reason(broken[0][1]),
                      step, moved)
    return step, value
  if broken:
    raise CheckpointError(
        f'checkpoint {directory}: no readable checkpoint (steps '
        f'{", ".join(str(b) for b, _ in broken)}; step {broken[0][0]}: {_reason(broken[0][1])}): '
        f'remove the broken step directories to train that phase again')
  return None, None


def _set_aside(directory: str, step: int) -> str:
  name = f'broken.{step}.{time.strftime("%Y%m%dT%H%M%S")}'
  if jax.process_index() == 0:
    # On Cloud Storage a rename copies each object, then deletes it.
    epath.Path(directory, str(step)).rename(epath.Path(directory, name))
  return name


def load_eval_params(directory: str, abstract_params, *, expect: Optional[dict] = None,
                     step: Optional[int] = None):
  """Loads the sampling parameters (EMA if kept) of a checkpoint in ``directory``: ``step``,
  else the newest readable one (a broken newest one is skipped with a warning).

  Args:
    directory: a phase directory (``.../checkpoints/teacher``).
    abstract_params: ``jax.ShapeDtypeStruct`` tree (with shardings) the parameters must fit.
    expect: meta entries that must match (e.g. the model section); a mismatch
      raises CheckpointError naming the path, the key and both values.
    step: the step to load (its failure is raised as it is).
  Returns:
    (params, meta).
  """
  load = lambda s: _load_eval_params(directory, s, abstract_params, expect)
  if step is not None:
    return load(step)
  found, value = newest_readable(directory, load)
  if found is None:
    raise CheckpointError(f'checkpoint {directory}: no checkpoint found there '
                          f'(expected a phase directory such as WORKDIR/checkpoints/teacher)')
  return value


def _load_eval_params(directory, step, abstract_params, expect):
  meta = read_meta(directory, step)
  for key, want in (expect or {}).items():
    have = meta.get(key)
    if json.loads(json.dumps(have)) != json.loads(json.dumps(want)):
      raise CheckpointError(f'checkpoint {directory}: {key}={have} does not match this '
                            f'config\'s {key}={want}')
  which = sampling_key(meta)
  mgr = manager(directory, create=False)
  restored = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item={which: abstract_params},
          restore_args={which: jax.tree.map(
              lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                             dtype=a.dtype), abstract_params)},
          partial_restore=True)))
  return restored.state[which], meta
