"""What every phase of every shipped config is wired to, as JSON: the registry's golden.

``describe(config)`` lists, for each phase of the config's plan (with every stage on, so
consistency and encoders are in), its loss binding (function, keyword values, frozen
scalars), checkpoint meta, sample grids (mode, sampler, w, steps), in-training quality
settings (sampler mode and kind, steps) and served (sampler, steps). It reads gdistill only
through what the code before the methods registry's per-kind hooks had as well (the phase
builder, the driver's hooks, the plan), so the same function run on that commit made
``tests/data/registry_golden.json``:

  git worktree add /tmp/before 91d6c7d && cd /tmp/before && \\
    PYTHONPATH=/tmp/before:/tmp/before/tests python /path/to/tests/registry_golden.py OUT.json
"""

import importlib.util
import json
import os
import sys
import types

import numpy as np

CONFIGS = ('smoke', 'fashion_mnist', 'fashion_mnist_latent', 'fashion_mnist_latent_teacher',
           'fashion_mnist_teacher', 'cifar10', 'imagenet64', 'imagenet64_dit')
ALL_STAGES = ('teacher', 'stage1', 'stage2', 'consistency', 'eval', 'translate')
# Settings a config changed on purpose after the golden was made, put back to the golden's
# values so the comparison still pins the wiring (what a change adds is tested on its own):
# configs/fashion_mnist.py (and the teacher config built on it) took stage2.w_min_frac 0.25
# and the stochastic sampler's students at 8 and 4 steps as its default (issue 30's claims
# for every seed; test_stochastic_students tests those phases), then the shorter run
# (issue 30's 60 minutes: stage 1, the 32/16/2/1-step halvings, translation's quality rows).
_PIXEL_RECIPE = {'stage2.w_min_frac': 0.0, 'stage2.stochastic.sampler_steps': (),
                 'stage1.num_steps': 1600, 'stage2.num_steps': 150,
                 'stage2.num_steps_for': ((8, 400), (4, 300), (2, 75), (1, 75)),
                 'translate.quality_per_pair': 100}
SINCE_GOLDEN = {'fashion_mnist': _PIXEL_RECIPE, 'fashion_mnist_teacher': _PIXEL_RECIPE}


def put_back(c, name: str):
  """``c`` (config ``name``) with SINCE_GOLDEN's values in place of today's."""
  for key, value in SINCE_GOLDEN.get(name, {}).items():
    *parents, leaf = key.split('.')
    section = c
    for part in parents:
      section = section[part]
    section[leaf] = value
  return c


def load_config(repo: str, name: str):
  spec = importlib.util.spec_from_file_location(f'cfg_{name}',
                                                os.path.join(repo, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  put_back(c, name)
  c.stages = ALL_STAGES
  c.translate.distill_encoder = True
  c.track.enabled = True
  return c


def _plain(v):
  if hasattr(v, 'shape') and hasattr(v, 'dtype'):
    return {'array': np.asarray(v).tolist(), 'dtype': str(np.asarray(v).dtype)}
  if callable(v) and hasattr(v, '__qualname__'):
    return f'<{v.__module__}.{v.__qualname__}>'
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  if isinstance(v, dict):
    return {str(k): _plain(x) for k, x in v.items()}
  return v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)


class _Store:
  image_shape, num_classes, mean_type = (28, 28, 1), 10, 'v'

  def denoiser(self, *, use_w, dropout=None):
    return f'<denoiser use_w={use_w} dropout={dropout}>'

  def model_meta(self, *, use_w):
    return {'use_w': use_w}

  def codec_meta(self):
    return {}

  def sampler(self, mode, sampler=''):  # the default as ``ModelStore.sampler`` resolves it
    return f'<sampler {mode}/{sampler or ("consistency" if mode == "consistency" else "ddim")}>'


def _loss(config, store, spec):
  from gdistill import phases  # pylint: disable=g-import-not-at-top
  if hasattr(spec, 'method') and hasattr(spec.method, 'bind_loss'):
    loss, frozen = spec.method.bind_loss(config, store, spec)
  else:  # the code before: the phase builder's table
    builder = phases.PhaseBuilder(config, store)
    loss, frozen = getattr(builder, builder.LOSSES[spec.kind])(spec)
  return {'func': _plain(loss.func), 'keywords': _plain(dict(loss.keywords)),
          'frozen': _plain(frozen)}


def _driver_hooks(config, store, spec):
  """The sample grids and in-training quality the driver (``train.Run``) sets up."""
  from gdistill import train  # pylint: disable=g-import-not-at-top
  from gdistill.eval import quick_fid  # pylint: disable=g-import-not-at-top
  grids, quick = [], []
  fake = types.SimpleNamespace(
      config=config, store=store, mesh=None, _features=(None, {'reference': None}),
      write_grid=lambda params, **kw: grids.append(kw))
  on_done = train.Run.grids_of(fake, spec)
  if on_done is not None:
    on_done(None)
  track, every = train.Run.tracker(fake, spec)
  if track is not None:
    real = quick_fid.QuickFid

    class Recorder:
      def __init__(self, **kw):
        quick.append({k: kw[k] for k in ('sample_fn', 'num_steps', 'mode', 'w_values')})

      def __call__(self, params):
        return {}
    quick_fid.QuickFid = Recorder
    try:
      track(types.SimpleNamespace(eval_params=None))
    finally:
      quick_fid.QuickFid = real
  return {'grids': _plain(grids), 'track': _plain(quick), 'track_every': every}


def describe(repo: str, name: str) -> dict:
  from gdistill import phases, run_plan, sharding  # pylint: disable=g-import-not-at-top
  config = load_config(repo, name)
  store = _Store()
  out = {}
  real_sharding = sharding.batch_sharding
  sharding.batch_sharding = lambda mesh: None
  try:
    for spec in run_plan.from_config(config).phases:
      d = {'serves': _plain(spec.serves), 'mode': spec.mode, 'use_w': spec.use_w,
           'num_steps': spec.num_steps(config),
           'meta': _plain(phases.meta(config, store, spec))}
      if spec.kind != 'teacher':
        d['loss'] = _loss(config, store, spec)
      d.update(_driver_hooks(config, store, spec))
      out[spec.name] = d
  finally:
    sharding.batch_sharding = real_sharding
  return out


def describe_all(repo: str) -> dict:
  return {name: describe(repo, name) for name in CONFIGS}


if __name__ == '__main__':
  here = os.getcwd()
  with open(sys.argv[1], 'w') as f:
    json.dump(describe_all(here), f, indent=1, sort_keys=True)
