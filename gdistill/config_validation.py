"""Checks the whole config up front; every error names the key, the value and
what was expected."""

from __future__ import annotations

from typing import Optional, Sequence

from gdistill import diffusion, sharding
from gdistill.models import unet

KNOWN_STAGES = ('teacher', 'stage1', 'stage2', 'eval', 'translate')
PRECISIONS = ('float32', 'bfloat16')


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
    image_shape: (H, W, C) of the dataset, once known; checks the U-Net can
      downsample it.
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
  if config.diffusion.weighting not in diffusion.LOSS_WEIGHTINGS:
    _err('diffusion.weighting', config.diffusion.weighting,
         f'one of {diffusion.LOSS_WEIGHTINGS}')
  if config.model.size not in unet.SIZES:
    _err('model.size', config.model.size, f'one of {sorted(unet.SIZES)}')
  if not config.data.name:
    _err('data.name', config.data.name, 'a dataset name such as fashion_mnist or cifar10')

  w_min, w_max = config.guidance.w_min, config.guidance.w_max
  if w_min < 0:
    _err('guidance.w_min', w_min, 'w_min >= 0 (w = 0 is the conditional model)')
  if w_max < w_min:
    _err('guidance.w_max', w_max, f'w_max >= guidance.w_min={w_min}')

  for phase in ('teacher', 'stage1', 'stage2'):
    _validate_optimisation(phase, config[phase], num_devices=num_devices,
                           num_processes=num_processes)
  if not 0.0 <= config.teacher.p_uncond < 1.0:
    _err('teacher.p_uncond', config.teacher.p_uncond, 'a probability in [0, 1)')

  start, smallest = config.stage2.start_steps, config.stage2.min_steps
  for key, v in (('stage2.start_steps', start), ('stage2.min_steps', smallest)):
    if not isinstance(v, int) or v < 1 or v & (v - 1):
      _err(key, v, 'a power of two')
  if start < 2 * smallest:
    _err('stage2.start_steps', start, f'at least 2 * stage2.min_steps = {2 * smallest}')
  if config.stage2.time_grid not in ('deterministic', 'both'):
    _err('stage2.time_grid', config.stage2.time_grid, '"deterministic" or "both"')

  if 'translate' in stages:
    _validate_translate(config, num_devices=num_devices, num_processes=num_processes)
  if 'eval' in stages:
    # Here, not when the sweep starts: a bad eval key must not wait for training to end.
    from gdistill.eval import plan  # pylint: disable=g-import-not-at-top  # plan imports us
    plan.check_eval_config(config, num_devices=num_devices)

  if image_shape is not None:
    h, w = image_shape[0], image_shape[1]
    factor = 2 ** (len(config.model.ch_mult) - 1)
    if h % factor or w % factor:
      _err('model.ch_mult', tuple(config.model.ch_mult),
           f'{len(config.model.ch_mult) - 1} halvings that divide the image size {h}x{w} '
           f'(it must be divisible by {factor}); use fewer levels or another dataset')


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
  if not (isinstance(p.warmup_steps, int) and p.warmup_steps >= 0):
    _err(f'{key}.warmup_steps', p.warmup_steps, 'an integer >= 0')
  divisor = num_devices or 1
  if p.batch_size % divisor or p.batch_size % num_processes:
    _err(f'{key}.batch_size', p.batch_size,
         f'a multiple of the number of devices ({divisor}) and processes ({num_processes})')


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
  # Distilled step counts need a decoder (stage-2 student) and, when distilled, an encoder.
  decoders, n = set(), config.stage2.start_steps // 2
  while n >= config.stage2.min_steps:
    decoders.add(n)
    n //= 2
  encoders, n = set(), start // 2
  while n >= smallest:
    encoders.add(n)
    n //= 2
  for n in t.distilled_steps:
    if n not in decoders:
      _err('translate.distilled_steps', tuple(t.distilled_steps),
           f'stage-2 student step counts (this config distils {sorted(decoders)})')
    if t.distill_encoder and n not in encoders:
      _err('translate.distilled_steps', tuple(t.distilled_steps),
           f'distilled encoder step counts (translate.encoder_start_steps={start} and '
           f'encoder_min_steps={smallest} give {sorted(encoders)})')
