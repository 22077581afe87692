"""Checks the whole config up front; every error names the key, the value and
what was expected."""

from __future__ import annotations

from typing import Optional, Sequence

from gdistill import diffusion, losses, methods, run_plan, sharding
from gdistill.eval import plan
from gdistill.models import registry, unet
from gdistill.denoiser import GUIDED_CLIPS

# The training stages in the methods registry's order, then the evaluation and translation
# (which also trains the distilled encoders): teacher, stage1, stage2, consistency, eval,
# translate.
KNOWN_STAGES = tuple(dict.fromkeys(
    m.stage for m in methods.METHODS.values() if m.stage != 'translate')) + ('eval', 'translate')
PRECISIONS = ('float32', 'bfloat16')
STUDENT_SAMPLERS = ('ddim', 'stochastic')  # the samplers of stage-2 students' rows


class ConfigError(ValueError):
  """A config value that cannot work."""


def _err(key, value, expected):
  raise ConfigError(f'{key}={value!r}: expected {expected}')


def _positive_int(key, value):
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    _err(key, value, 'a positive integer')


def validate(config, *, image_shape: Optional[Sequence[int]] = None,
             num_devices: Optional[int] = None, num_processes: int = 1) -> None:
  """Raises ConfigError for the first value that cannot work.

  Args:
    config: the experiment ConfigDict.
    image_shape: (H, W, C) of the dataset, once known; checks the network fits it
      (the U-Net can downsample it, the DiT's patches divide it).
    num_devices: devices of the mesh, once known; checks batch sizes split.
    num_processes: JAX processes; batch sizes must split over them too.
  """
  stages = tuple(config.stages)
  for s in stages:
    if s not in KNOWN_STAGES:
      _err('stages', stages, f'names from {KNOWN_STAGES}')
  order = [KNOWN_STAGES.index(s) for s in stages]
  if order != sorted(order) or len(set(stages)) != len(stages):
    _err('stages', stages, f'each at most once, in the order {KNOWN_STAGES}')
  if config.sharding not in sharding.STRATEGIES:
    _err('sharding', config.sharding, f'one of {sharding.STRATEGIES}')
  if config.precision not in PRECISIONS:
    _err('precision', config.precision, f'one of {PRECISIONS}')
  if not isinstance(config.get('cpu_xla_tuned', True), bool):
    _err('cpu_xla_tuned', config.cpu_xla_tuned, 'True or False')
  if config.diffusion.mean_type not in diffusion.MEAN_TYPES:
    _err('diffusion.mean_type', config.diffusion.mean_type, f'one of {diffusion.MEAN_TYPES}')
  for section in ('teacher', 'stage1', 'stage2'):
    _validate_weighting(section, config[section])
  _validate_weighting('translate.encoder', config.translate.encoder)
  if config.diffusion.weighting not in diffusion.LOSS_WEIGHTINGS:
    _err('diffusion.weighting', config.diffusion.weighting,
         f'one of {diffusion.LOSS_WEIGHTINGS}')
  _validate_model(config.model.to_dict(), image_shape)
  if not config.data.name:
    _err('data.name', config.data.name, 'a dataset name such as fashion_mnist or cifar10')
  workers = config.data.get('num_workers', -1)
  if not isinstance(workers, int) or isinstance(workers, bool) or workers < -1:
    _err('data.num_workers', workers, 'a number of worker processes >= 0, or -1 (one per '
         '4 usable cores, at most 8)')

  w_min, w_max = config.guidance.w_min, config.guidance.w_max
  if w_min < 0:
    _err('guidance.w_min', w_min, 'w_min >= 0 (w = 0 is the conditional model)')
  if w_max < w_min:
    _err('guidance.w_max', w_max, f'w_max >= guidance.w_min={w_min}')
  clip = config.guidance.get('teacher_clip', 'guided')
  if clip not in GUIDED_CLIPS:
    _err('guidance.teacher_clip', clip, f'one of {GUIDED_CLIPS}')

  for phase in ('teacher', 'stage1', 'stage2'):
    _validate_optimisation(phase, config[phase], num_devices=num_devices,
                           num_processes=num_processes)
  if not 0.0 <= config.teacher.p_uncond < 1.0:
    _err('teacher.p_uncond', config.teacher.p_uncond, 'a probability in [0, 1)')
  source = config.teacher.get('source', '')
  if source and not source.startswith('python:'):
    _err('teacher.source', source, "'' or python:package.module:factory")
  if source:  # its student's w input is the w hook's (gdistill/w_hook.py)
    for key, default in (('w_embedding', 'fourier'), ('w_warmup_steps', 0)):
      if config.model.get(key, default) != default:
        _err(f'model.{key}', config.model[key], f'{default!r}: gdistill\'s networks\' option, '
             f'and the teacher.source teacher\'s student has the w hook\'s embedding')

  start, smallest = config.stage2.start_steps, config.stage2.min_steps
  for key, v in (('stage2.start_steps', start), ('stage2.min_steps', smallest)):
    if not isinstance(v, int) or v < 1 or v & (v - 1):
      _err(key, v, 'a power of two')
  if start < 2 * smallest:
    _err('stage2.start_steps', start, f'at least 2 * stage2.min_steps = {2 * smallest}')
  if config.stage2.time_grid not in ('deterministic', 'both'):
    _err('stage2.time_grid', config.stage2.time_grid, '"deterministic" or "both"')
  _validate_num_steps_for('stage2', config.stage2, run_plan.halvings(start, smallest))
  if config.stage2.get('stochastic') is not None and 'stage2' in stages:
    _validate_stochastic(config, num_devices=num_devices, num_processes=num_processes)

  if 'consistency' in stages:
    _validate_consistency(config, num_devices=num_devices, num_processes=num_processes)
  if 'translate' in stages:
    _validate_translate(config, num_devices=num_devices, num_processes=num_processes)
  if config.track.enabled:
    _validate_track(config, num_devices=num_devices)
  if 'eval' in stages:
    # Here, not when the sweep starts: a bad eval key must not wait for training to end.
    validate_eval(config, num_devices=num_devices)


def _validate_weighting(key, section) -> None:
  """A phase section's ``weighting``: '' (the diffusion one) or a known weighting."""
  w = section.get('weighting', '')
  if w and w not in diffusion.LOSS_WEIGHTINGS:
    _err(f'{key}.weighting', w, f"'' (diffusion.weighting) or one of "
         f'{diffusion.LOSS_WEIGHTINGS}')


def _validate_stochastic(config, *, num_devices, num_processes) -> None:
  """``stage2.stochastic``: the stochastic sampler's dedicated students."""
  st, s2 = config.stage2.stochastic, config.stage2
  steps = tuple(st.sampler_steps)
  if not steps:
    return
  _validate_optimisation('stage2.stochastic', st, num_devices=num_devices,
                         num_processes=num_processes)
  halved = run_plan.halvings(s2.start_steps, s2.min_steps)
  if st.init not in ('ddim', 'teacher'):
    _err('stage2.stochastic.init', st.init, "'ddim' (a copy of the N-step DDIM student) or "
         "'teacher' (of the 2N-step one)")
  need = ' and the N-step DDIM student' if st.init == 'ddim' else ''
  for n in steps:
    ok = isinstance(n, int) and not isinstance(n, bool) and n >= 2 and n % 2 == 0
    if not ok or (n not in halved and n != s2.start_steps) or (
        st.init == 'ddim' and n // 2 not in halved):
      _err('stage2.stochastic.sampler_steps', steps,
           f'even step counts 2N whose 2N-step teacher (stage2.start_steps={s2.start_steps} '
           f'or a halving of {halved}){need} exist')
  if s2.time_grid == 'both':
    _err('stage2.stochastic.sampler_steps', steps, "() with stage2.time_grid='both' (its "
         "students already serve the stochastic sampler), or time_grid='deterministic'")
  _validate_weighting('stage2.stochastic', st)


def _validate_consistency(config, *, num_devices, num_processes) -> None:
  """The ``consistency`` section (gdistill/consistency.py)."""
  cd = config.get('consistency')
  if cd is None:
    _err('consistency', None, 'a consistency section (config_base.base_config has one)')
  _validate_optimisation('consistency', cd, num_devices=num_devices, num_processes=num_processes)
  for key in ('solver', 'init'):
    if cd[key] not in ('stage1', 'teacher'):
      _err(f'consistency.{key}', cd[key], "'stage1' or 'teacher'")
  _positive_int('consistency.grid_steps', cd.grid_steps)
  _positive_int('consistency.skip', cd.skip)
  if cd.skip > cd.grid_steps:
    _err('consistency.skip', cd.skip, f'at most consistency.grid_steps={cd.grid_steps}')
  if cd.distance not in losses.DISTANCES:
    _err('consistency.distance', cd.distance, f'one of {losses.DISTANCES}')
  steps = tuple(cd.sample_steps)
  if not steps or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in steps):
    _err('consistency.sample_steps', steps, 'a non-empty tuple of positive step counts')


def _validate_model(m: dict, image_shape) -> None:
  """The model section (as a dict): its architecture's keys only (models/registry.py),
  and values that build a network for images of ``image_shape`` (H, W, C) once known."""
  arch = registry.arch_name(m)
  if arch not in registry.ARCHS:
    _err('model.arch', arch, f'one of {tuple(sorted(registry.ARCHS))}')
  spec = registry.ARCHS[arch]
  for key in m:
    if key != 'arch' and key not in spec.keys:
      _err(f'model.{key}', m[key], f"no such key for model.arch={arch!r} (its keys: "
           f"{', '.join(spec.keys)})")
  if m.get('size') not in spec.sizes:
    _err('model.size', m.get('size'), f'one of {sorted(spec.sizes)} (model.arch={arch!r})')
  for key in ('remat', 'w_relative', 'resblock_resample'):
    if not isinstance(m.get(key, False), bool):
      _err(f'model.{key}', m[key], 'True or False')
  dropout = m.get('dropout', 0.0)
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or \
      not 0.0 <= dropout < 1.0:
    _err('model.dropout', dropout, 'a rate in [0, 1)')
  if m.get('w_embedding', 'fourier') not in unet.W_EMBEDDINGS:
    _err('model.w_embedding', m['w_embedding'], f'one of {unet.W_EMBEDDINGS}')
  warmup = m.get('w_warmup_steps', 0)
  if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
    _err('model.w_warmup_steps', warmup, 'an integer >= 0 (stage-1 training steps over which '
         'the w embedding ramps from 0 to 1; 0: no warm-up)')
  if arch == 'dit':
    _validate_dit(dict(spec.sizes[m['size']], **m), image_shape)
  else:
    _validate_unet(dict(spec.sizes[m['size']], **m), image_shape)


def _validate_unet(m, image_shape) -> None:
  """A U-Net's section with its size's defaults filled in."""
  head_dim = m.get('attn_head_dim', 0)
  if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 0:
    _err('model.attn_head_dim', head_dim, 'an integer >= 0 (channels per attention head; 0: '
         'single-head attention)')
  mult = tuple(m['ch_mult'])
  # Where attention runs: the middle block always, at the lowest resolution; a level's
  # blocks where its resolution is in attn_resolutions (known with the image size).
  attention = [('the middle block', m['ch'] * mult[-1])]
  if image_shape is not None:
    h, w = image_shape[0], image_shape[1]
    levels = len(mult)
    factor = 2 ** (levels - 1)
    if h % factor or w % factor:
      _err('model.ch_mult', mult,
           f'{levels - 1} halvings that divide the image size {h}x{w} '
           f'(it must be divisible by {factor}); use fewer levels or another dataset')
    attention += [(f'resolution {h >> level}', m['ch'] * k) for level, k in enumerate(mult)
                  if h >> level in tuple(m['attn_resolutions'])]
  for where, channels in attention if head_dim else ():
    if channels % head_dim:
      _err('model.attn_head_dim', head_dim,
           f'a divisor of the channels of every attention block ({channels} at {where})')


def _validate_dit(m, image_shape) -> None:
  """A DiT's section with its size's defaults filled in."""
  for key in ('patch_size', 'hidden_size', 'depth', 'num_heads'):
    _positive_int(f'model.{key}', m[key])
  ratio = m['mlp_ratio']
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
    _err('model.mlp_ratio', ratio, 'a positive number')
  if m['hidden_size'] % m['num_heads'] or m['hidden_size'] % 4:
    _err('model.hidden_size', m['hidden_size'],
         f"a multiple of model.num_heads={m['num_heads']} and of 4 (the 2-D sin-cos position "
         f"embedding)")
  if image_shape is not None:
    h, w, p = image_shape[0], image_shape[1], m['patch_size']
    if h % p or w % p:
      _err('model.patch_size', p, f'a divisor of the image size {h}x{w}')


def _validate_optimisation(key, p, *, num_devices, num_processes) -> None:
  """A training phase's section: steps, batch, checkpointing and optimiser."""
  for name in ('num_steps', 'batch_size', 'checkpoint_every'):
    _positive_int(f'{key}.{name}', p[name])
  if not p.learning_rate > 0:
    _err(f'{key}.learning_rate', p.learning_rate, 'a positive number')
  if p.lr_decay not in ('constant', 'linear'):
    _err(f'{key}.lr_decay', p.lr_decay, '"constant" or "linear"')
  if not 0.0 <= p.ema_decay < 1.0:
    _err(f'{key}.ema_decay', p.ema_decay, 'a number in [0, 1)')
  for name in ('ema_warmup', 'w_balance'):
    if not isinstance(p.get(name, False), bool):
      _err(f'{key}.{name}', p[name], 'True or False')
  frac = p.get('w_min_frac', 0.0)
  if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac < 1.0:
    _err(f'{key}.w_min_frac', frac, 'a number in [0, 1)')
  if not (isinstance(p.warmup_steps, int) and p.warmup_steps >= 0):
    _err(f'{key}.warmup_steps', p.warmup_steps, 'an integer >= 0')
  divisor = num_devices or 1
  if p.batch_size % divisor or p.batch_size % num_processes:
    _err(f'{key}.batch_size', p.batch_size,
         f'a multiple of the number of devices ({divisor}) and processes ({num_processes})')


def _validate_num_steps_for(key, p, student_steps) -> None:
  """``SECTION.num_steps_for``: (student steps of one of its halvings, training steps) pairs."""
  pairs = p.get('num_steps_for', ())
  expected = (f'pairs (student steps, training steps > 0) with student steps among the '
              f'halvings {list(student_steps)}, each once, e.g. ((2, 100), (1, 100))')
  try:
    ok = all(len(pair) == 2 for pair in pairs)
  except TypeError:
    ok = False
  if not ok:
    _err(f'{key}.num_steps_for', pairs, expected)
  seen = [n for n, _ in pairs]
  bad_int = lambda v: not isinstance(v, int) or isinstance(v, bool)
  for n, steps in pairs:
    if bad_int(n) or bad_int(steps) or n not in student_steps or steps < 1 or seen.count(n) > 1:
      _err(f'{key}.num_steps_for', pairs, expected)


def _validate_track(config, *, num_devices) -> None:
  """The track section (quick FID while training) and the feature network it needs."""
  t = config.track
  for k in ('num_samples', 'batch_size', 'steps'):
    _positive_int(f'track.{k}', t[k])
  for k in ('teacher_every', 'student_every'):
    if not isinstance(t[k], int) or isinstance(t[k], bool) or t[k] < 0:
      _err(f'track.{k}', t[k], 'an integer >= 0 (0: at the end of the phase only)')
  if t.num_samples < 2 * (config.eval.precision_recall_k + 1):
    _err('track.num_samples', t.num_samples,
         f'at least {2 * (config.eval.precision_recall_k + 1)} (FID needs a covariance)')
  ws = tuple(t.w_values)
  if not ws or any(not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0 for w in ws):
    _err('track.w_values', ws, 'a non-empty tuple of guidance weights >= 0')
  if num_devices and t.batch_size % num_devices:
    _err('track.batch_size', t.batch_size,
         f'a multiple of the number of devices ({num_devices})')
  e = config.eval
  if plan.feature_net_kind(e.feature_net, config.data.name) == 'inception' and \
      not e.inception_weights:
    _err('eval.inception_weights', e.inception_weights,
         'the path of the FID Inception-v3 weights: track.enabled=True scores samples with '
         f'Inception for data.name={config.data.name!r}; or set track.enabled=False')


def _validate_translate(config, *, num_devices, num_processes) -> None:
  """The translate section (encoder distillation and translation grids)."""
  t = config.translate
  p, key = t.encoder, 'translate.encoder'
  _validate_optimisation(key, p, num_devices=num_devices, num_processes=num_processes)
  if p.time_grid not in ('deterministic', 'both'):
    _err(f'{key}.time_grid', p.time_grid, '"deterministic" or "both"')

  start, smallest = t.encoder_start_steps, t.encoder_min_steps
  for k, v in (('translate.encoder_start_steps', start), ('translate.encoder_min_steps', smallest)):
    if not isinstance(v, int) or v < 1 or v & (v - 1):
      _err(k, v, 'a power of two')
  if start < 2 * smallest:
    _err('translate.encoder_start_steps', start,
         f'at least 2 * translate.encoder_min_steps = {2 * smallest}')
  for k in ('encode_w', 'w'):
    if not t[k] >= 0:
      _err(f'translate.{k}', t[k], 'a guidance weight >= 0')
  pairs = tuple(tuple(q) for q in t.pairs)
  if not pairs or any(len(q) != 2 or not all(isinstance(c, int) and c >= 0 for c in q)
                      for q in pairs):
    _err('translate.pairs', pairs, '(source, target) pairs of class labels, e.g. ((7, 9),)')
  for k in ('num_per_pair', 'ddim_steps', 'quality_per_pair'):
    _positive_int(f'translate.{k}', t[k])
  encode_steps = t.get('encode_steps', 0)
  if not isinstance(encode_steps, int) or isinstance(encode_steps, bool) or encode_steps < 0:
    _err('translate.encode_steps', encode_steps,
         'a number of DDIM steps >= 1, or 0 for the decoder\'s own')
  # Distilled step counts need a decoder (stage-2 student) and, when distilled, an encoder.
  config_plan = run_plan.from_config(config)
  decoders = set(config_plan.student_steps)
  encoders = set(run_plan.halvings(start, smallest))  # whether or not they are distilled
  for n in t.distilled_steps:
    if n not in decoders:
      _err('translate.distilled_steps', tuple(t.distilled_steps),
           f'stage-2 student step counts (this config distils {sorted(decoders)})')
    if t.distill_encoder and n not in encoders:
      _err('translate.distilled_steps', tuple(t.distilled_steps),
           f'distilled encoder step counts (translate.encoder_start_steps={start} and '
           f'encoder_min_steps={smallest} give {sorted(encoders)})')


def _positive_ints(key, values, *, allow_empty: bool):  # an eval.* key
  values = tuple(values)
  if not values and not allow_empty:
    _err(f'eval.{key}', values, 'a non-empty tuple of positive integers')
  for v in values:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      _err(f'eval.{key}', values, 'a tuple of positive integers')


def validate_eval(config, *, num_devices: Optional[int] = None) -> None:
  """Raises ConfigError naming the first ``eval.*`` value that cannot work."""
  e = config.eval
  for key in ('num_samples', 'batch_size', 'classifier_steps', 'classifier_batch_size',
              'precision_recall_k', 'grid_per_class'):
    v = e[key]
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      _err(f'eval.{key}', v, 'a positive integer')
  if not e.classifier_learning_rate > 0:
    _err('eval.classifier_learning_rate', e.classifier_learning_rate, 'a positive number')
  for key in ('seed', 'expensive_nfe', 'reference_examples'):
    if not isinstance(e[key], int) or e[key] < 0:
      _err(f'eval.{key}', e[key], 'an integer >= 0')
  if e.num_samples < max(plan.IS_SPLITS, e.precision_recall_k + 1):
    _err('eval.num_samples', e.num_samples,
         f'at least {max(plan.IS_SPLITS, e.precision_recall_k + 1)} (Inception Score uses '
         f'{plan.IS_SPLITS} splits; precision/recall needs more than eval.precision_recall_k)')
  if num_devices and e.batch_size % num_devices:
    _err('eval.batch_size', e.batch_size, f'a multiple of the number of devices ({num_devices})')
  for key in ('w_values', 'expensive_w'):
    ws = tuple(e[key])
    if (key == 'w_values' and not ws) or any(
        not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0 for w in ws):
      _err(f'eval.{key}', ws, 'a non-empty tuple of guidance weights >= 0' if key == 'w_values'
           else 'a tuple of guidance weights >= 0')
  models = tuple(e.models)
  if not models or any(m not in plan.MODELS for m in models):
    _err('eval.models', models, f'a non-empty subset of {plan.MODELS}')
  samplers = tuple(e.samplers)
  if 'student' in models and (not samplers or any(s not in STUDENT_SAMPLERS for s in samplers)):
    _err('eval.samplers', samplers, f'a non-empty subset of {STUDENT_SAMPLERS}')
  _positive_ints('teacher_steps', e.teacher_steps, allow_empty='teacher' not in models)
  _positive_ints('teacher_ddim_steps', e.teacher_ddim_steps,
                 allow_empty='teacher_ddim' not in models)
  _positive_ints('student_steps', e.student_steps, allow_empty=True)
  if e.feature_net not in plan.FEATURE_NETS:
    _err('eval.feature_net', e.feature_net, f'one of {plan.FEATURE_NETS}')
  if (plan.feature_net_kind(e.feature_net, config.data.name) == 'inception'
      and not e.inception_weights):
    _err('eval.inception_weights', e.inception_weights,
         f'the path of the FID Inception-v3 weights (.pth or .npz; see '
         f'gdistill/eval/inception.py): eval.feature_net={e.feature_net!r} uses Inception '
         f'for data.name={config.data.name!r}; or leave \'eval\' out of --config.stages')
  if not isinstance(e.reference_split, str) or not e.reference_split:
    _err('eval.reference_split', e.reference_split, 'a split name such as train')
  if not isinstance(e.floor_split, str):
    _err('eval.floor_split', e.floor_split, 'a split name such as test, or "" for data.eval_split')
