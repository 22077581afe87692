"""The workdir's record of the config that created it.

A rerun with the same command resumes; a rerun whose config changes what was
trained (model, data, diffusion, schedules) is refused before anything is
written, so an earlier run is never mixed with or overwritten by another.
"""

from __future__ import annotations

import json
import os

import jax

from gdistill import storage

CONFIG_FILE = 'config.json'
# Keys that may change between invocations on one workdir: what to run next,
# how to log and evaluate, and how to lay the work out on devices (and in memory:
# model.remat).
MUTABLE_PREFIXES = ('stages', 'log_every', 'samples', 'eval', 'translate', 'checkpoint',
                    'mesh', 'sharding', 'multihost', 'data.data_dir', 'data.download',
                    'data.num_workers',
                    'teacher_checkpoint', 'precision', 'cpu_xla_tuned', 'track',
                    'model.remat', 'guidance.teacher_clip')
# Keys added after workdirs were recorded, with the value that behaves as gdistill did
# before them: a record without the key matches a config with that value.
ADDED = {**{f'{section}.ema_warmup': False for section in ('teacher', 'stage1', 'stage2')},
         'model.w_relative': False, 'stage1.w_balance': False, 'stage2.num_steps_for': [],
         'stage2.w_balance': False, 'stage1.w_min_frac': 0.0, 'teacher.source': '',
         'stage2.w_min_frac': 0.0, 'codec.path': '',
         'teacher.allow_signal_at_t1': False, 'model.w_embedding': 'fourier',
         'model.w_warmup_steps': 0, 'model.attn_head_dim': 0, 'model.resblock_resample': False,
         **{f'{section}.weighting': '' for section in ('teacher', 'stage1', 'stage2')}}
# Sections of phases added after workdirs were recorded, with the stage that trains them: a
# record without the section never trained its phase, so it matches whatever values the
# config has there.
ADDED_SECTIONS = {'consistency': 'consistency', 'stage2.stochastic': 'stage2'}
# A phase whose learning rate is constant after warm-up can be trained longer: its
# num_steps may grow (the phase resumes from its last checkpoint).
EXTENDABLE = ('teacher', 'stage1', 'stage2')


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


def _extended(key, old, new) -> bool:
  """``SECTION.num_steps`` grown on a phase whose schedule is constant after warm-up."""
  section, _, name = key.rpartition('.')
  if name != 'num_steps' or section not in EXTENDABLE:
    return False
  constant = all(d.get(f'{section}.lr_decay') == 'constant' for d in (old, new))
  return constant and isinstance(old.get(key), int) and new.get(key, 0) >= old[key]


def check_and_record_config(config, workdir: str) -> None:
  """Raises WorkdirError if ``workdir`` holds a run of an incompatible config;
  else records the config (first run) in ``workdir/config.json``."""
  check_config(config, workdir)
  record_config(config, workdir)


def _flag(value) -> str:
  """A config.json value as a --config.KEY= flag writes it (lists as tuples)."""
  def tuples(v):
    return tuple(tuples(x) for x in v) if isinstance(v, list) else v
  return repr(tuples(value)) if isinstance(value, list) else str(value)


def check_config(config, workdir: str) -> None:
  """Raises WorkdirError if ``workdir`` holds a run of an incompatible config."""
  storage.check_reachable(workdir)
  if storage.exists(workdir) and not storage.isdir(workdir):
    raise WorkdirError(f'--workdir={workdir} is a file, expected a directory (new, or the '
                       f'workdir of a gdistill run)')
  path = os.path.join(workdir, CONFIG_FILE)
  new = _flatten(config.to_dict())
  if storage.exists(path):
    try:
      old = _flatten(json.loads(storage.read_text(path)))
    except (OSError, ValueError) as e:
      raise WorkdirError(f'{path}: unreadable ({e}); expected the config.json of a gdistill run')
    old = {**{k: v for k, v in ADDED.items() if k in new}, **old}
    for section in ADDED_SECTIONS:
      if not any(k.startswith(section + '.') for k in old):
        old |= {k: v for k, v in new.items() if k.startswith(section + '.')}
    differ = [key for key in sorted(set(old) | set(new))
              if not (_mutable(key) or _extended(key, old, new))
              and old.get(key, '<absent>') != new.get(key, '<absent>')]
    if differ:
      def listed(d):
        return ', '.join(f'{k}={d.get(k, "<absent>")!r}' for k in differ)
      resume = ''
      if all(k in old for k in differ):  # the flags that give the recorded run back
        resume = ' (' + ' '.join(f'--config.{k}="{_flag(old[k])}"' for k in differ) + ')'
      raise WorkdirError(
          f'workdir {workdir} holds a run with {listed(old)} but this config has '
          f'{listed(new)}: use another --workdir, or the same config to resume{resume}')
    return
  if storage.isdir(os.path.join(workdir, 'checkpoints')):
    raise WorkdirError(f'workdir {workdir} holds checkpoints but no {CONFIG_FILE}: expected an '
                       f'empty or gdistill workdir')


def record_config(config, workdir: str) -> None:
  """Writes ``workdir/config.json`` on a workdir's first run, and again when a run
  trains a phase longer (``EXTENDABLE``) or first trains one of ``ADDED_SECTIONS``, on
  process 0."""
  path = os.path.join(workdir, CONFIG_FILE)
  if storage.exists(path):
    old = _flatten(json.loads(storage.read_text(path)))
    new = _flatten(config.to_dict())
    # A section of ADDED_SECTIONS whose stage this run trains is recorded from now on.
    gained = [sec for sec, stage in ADDED_SECTIONS.items()
              if stage in tuple(config.get('stages', ()))
              and not any(k.startswith(sec + '.') for k in old)]
    if not gained and not any(_extended(k, old, new) and new[k] != old[k] for k in new):
      return
  if jax.process_index() == 0:
    storage.write_text(path, json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))
