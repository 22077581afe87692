"""The workdir's record of the config that created it.

A rerun with the same command resumes; a rerun whose config changes what was
trained (model, data, diffusion, schedules) is refused before anything is
written, so an earlier run is never mixed with or overwritten by another.
"""

from __future__ import annotations

import json
import os

import jax

CONFIG_FILE = 'config.json'
# Keys that may change between invocations on one workdir: what to run next,
# how to log and evaluate, and how to lay the work out on devices.
MUTABLE_PREFIXES = ('stages', 'log_every', 'samples', 'eval', 'translate', 'checkpoint',
                    'mesh', 'sharding', 'multihost', 'data.data_dir', 'data.download',
                    'teacher_checkpoint', 'precision', 'cpu_xla_tuned')


class WorkdirError(ValueError):
  """The workdir holds a run of an incompatible config."""


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = json.loads(json.dumps(v))  # tuples -> lists, as read back
  return out


def _mutable(key):
  return any(key == p or key.startswith(p + '.') for p in MUTABLE_PREFIXES)


def check_and_record_config(config, workdir: str) -> None:
  """Raises WorkdirError if ``workdir`` holds a run of an incompatible config;
  else records the config (first run) in ``workdir/config.json``."""
  check_config(config, workdir)
  record_config(config, workdir)


def check_config(config, workdir: str) -> None:
  """Raises WorkdirError if ``workdir`` holds a run of an incompatible config."""
  path = os.path.join(workdir, CONFIG_FILE)
  new = _flatten(config.to_dict())
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = _flatten(json.load(f))
    except (OSError, ValueError) as e:
      raise WorkdirError(f'{path}: unreadable ({e}); expected the config.json of a gdistill run')
    for key in sorted(set(old) | set(new)):
      if _mutable(key):
        continue
      if old.get(key, '<absent>') != new.get(key, '<absent>'):
        raise WorkdirError(
            f'workdir {workdir} holds a run with {key}={old.get(key, "<absent>")!r} but this '
            f'config has {key}={new.get(key, "<absent>")!r}: use another --workdir, or the '
            f'same config to resume')
    return
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise WorkdirError(f'workdir {workdir} holds checkpoints but no {CONFIG_FILE}: expected an '
                       f'empty or gdistill workdir')


def record_config(config, workdir: str) -> None:
  """Writes ``workdir/config.json`` on a workdir's first run (process 0)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    return
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
