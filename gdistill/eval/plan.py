"""Which settings the evaluation sweep runs: a pure function of the eval config.

A setting is (model, steps, sampler, w). NFE is counted as the paper does
(METHOD.md section 8): a guided teacher step costs 2 network evaluations, a
distilled student step 1. The stochastic sampler at N steps takes jumps of
2/N starting on the 1/N grid, so it is served by the N/2-step student (trained
on that finer grid, stage2.time_grid='both'): students with M steps give
stochastic rows at N = 2M. (N = 1 stochastic would equal deterministic and
never arises.)
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

from gdistill.config_validation import ConfigError
from gdistill.samplers import SAMPLERS

MODELS = ('teacher', 'teacher_ddim', 'student')
FEATURE_NETS = ('auto', 'classifier', 'inception')
CLASSIFIER_DATASETS = ('fashion_mnist', 'mnist')
IS_SPLITS = 10


def row_key(model: str, steps: int, sampler: str, w: float) -> tuple:
  """Identity of a setting (and of its report row)."""
  return (model, int(steps), sampler, round(float(w), 6))


@dataclasses.dataclass(frozen=True)
class Setting:
  """One row of the sweep.

  Attributes:
    model: ``teacher`` (guided DDIM, reference step counts), ``teacher_ddim``
      (the same sampler at few steps: the baseline) or ``student``.
    steps: sampling steps N.
    sampler: ``ddim`` or ``stochastic``.
    w: guidance weight.
    phase: checkpoint phase the parameters come from (``teacher``, ``stage2_n0008``).
  """
  model: str
  steps: int
  sampler: str
  w: float
  phase: str

  @property
  def mode(self) -> str:
    """The ``sampling.make_sample_fn`` mode."""
    return 'student' if self.model == 'student' else 'guided'

  @property
  def nfe(self) -> int:
    return self.steps * (1 if self.model == 'student' else 2)

  @property
  def key(self) -> tuple:
    return row_key(self.model, self.steps, self.sampler, self.w)

  @property
  def label(self) -> str:
    return f'{self.model} {self.sampler} steps={self.steps} (NFE {self.nfe}) w={self.w:g}'

  @property
  def slug(self) -> str:
    return f'{self.model}-{self.sampler}-steps{self.steps:03d}-w{self.w:g}'


def _ints(xs) -> list[int]:
  return [int(x) for x in xs]


def build_plan(*, w_values: Sequence[float], models: Sequence[str],
               teacher_steps: Sequence[int], teacher_ddim_steps: Sequence[int],
               student_phases: Mapping[int, str], samplers: Sequence[str], expensive_nfe: int = 0,
               expensive_w: Sequence[float] = ()) -> list[Setting]:
  """The sweep's settings, cheapest model first and grouped by checkpoint.

  Args:
    w_values: guidance weights of every row.
    models: subset of MODELS to run.
    teacher_steps: step counts of the guided-DDIM teacher reference rows.
    teacher_ddim_steps: few-step counts of the teacher baseline (a count also in
      ``teacher_steps`` is run once, as ``teacher``).
    student_phases: checkpoint phase of each student, by its step count M.
    samplers: samplers of the student rows (``ddim``: N = M; ``stochastic``: N = 2M).
    expensive_nfe: rows with NFE above this run only at ``expensive_w``; 0 means no limit.
    expensive_w: the guidance weights of the expensive rows.
  """
  cheap_w = [float(w) for w in w_values]
  rich_w = [w for w in cheap_w if any(abs(w - float(e)) < 1e-9 for e in expensive_w)]
  out: list[Setting] = []

  def add(model, steps, sampler, phase):
    s0 = Setting(model, steps, sampler, 0.0, phase)
    ws = rich_w if expensive_nfe and s0.nfe > expensive_nfe else cheap_w
    out.extend(dataclasses.replace(s0, w=w) for w in ws)

  if 'student' in models:
    for m in sorted(student_phases):
      if 'ddim' in samplers:
        add('student', m, 'ddim', student_phases[m])
      if 'stochastic' in samplers:
        add('student', 2 * m, 'stochastic', student_phases[m])
  reference = sorted(set(_ints(teacher_steps))) if 'teacher' in models else []
  if 'teacher_ddim' in models:
    for n in sorted(set(_ints(teacher_ddim_steps)) - set(reference)):
      add('teacher_ddim', n, 'ddim', 'teacher')
  for n in reference:
    add('teacher', n, 'ddim', 'teacher')
  return out


def plan_from_config(eval_config, student_phases: Mapping[int, str]) -> list[Setting]:
  """``build_plan`` with the eval section's keys.

  ``student_phases``: the finished students (step count -> phase); the config's
  ``student_steps`` (empty: all) selects among them.
  """
  e = eval_config
  wanted = set(_ints(e.student_steps))
  chosen = {m: p for m, p in student_phases.items() if not wanted or m in wanted}
  return build_plan(w_values=e.w_values, models=e.models, teacher_steps=e.teacher_steps,
                    teacher_ddim_steps=e.teacher_ddim_steps, student_phases=chosen,
                    samplers=e.samplers, expensive_nfe=e.expensive_nfe,
                    expensive_w=e.expensive_w)


def feature_net_kind(feature_net: str, dataset: str) -> str:
  """``auto`` -> ``classifier`` for MNIST-like data (Inception features of 28x28
  grayscale images mean little), ``inception`` otherwise."""
  if feature_net != 'auto':
    return feature_net
  return 'classifier' if dataset.split('/')[0].split(':')[0] in CLASSIFIER_DATASETS \
      else 'inception'


def _err(key, value, expected):
  raise ConfigError(f'eval.{key}={value!r}: expected {expected}')


def _positive_ints(key, values, *, allow_empty: bool):
  values = tuple(values)
  if not values and not allow_empty:
    _err(key, values, 'a non-empty tuple of positive integers')
  for v in values:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      _err(key, values, 'a tuple of positive integers')


def check_eval_config(config, *, num_devices: Optional[int] = None) -> None:
  """Raises ConfigError naming the first ``eval.*`` value that cannot work."""
  e = config.eval
  for key in ('num_samples', 'batch_size', 'classifier_steps', 'classifier_batch_size',
              'precision_recall_k', 'grid_per_class'):
    v = e[key]
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      _err(key, v, 'a positive integer')
  if not e.classifier_learning_rate > 0:
    _err('classifier_learning_rate', e.classifier_learning_rate, 'a positive number')
  for key in ('seed', 'expensive_nfe', 'reference_examples'):
    if not isinstance(e[key], int) or e[key] < 0:
      _err(key, e[key], 'an integer >= 0')
  if e.num_samples < max(IS_SPLITS, e.precision_recall_k + 1):
    _err('num_samples', e.num_samples,
         f'at least {max(IS_SPLITS, e.precision_recall_k + 1)} (Inception Score uses '
         f'{IS_SPLITS} splits; precision/recall needs more than eval.precision_recall_k)')
  if num_devices and e.batch_size % num_devices:
    _err('batch_size', e.batch_size, f'a multiple of the number of devices ({num_devices})')
  for key in ('w_values', 'expensive_w'):
    ws = tuple(e[key])
    if (key == 'w_values' and not ws) or any(
        not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0 for w in ws):
      _err(key, ws, 'a non-empty tuple of guidance weights >= 0' if key == 'w_values'
           else 'a tuple of guidance weights >= 0')
  models = tuple(e.models)
  if not models or any(m not in MODELS for m in models):
    _err('models', models, f'a non-empty subset of {MODELS}')
  samplers = tuple(e.samplers)
  if 'student' in models and (not samplers or any(s not in SAMPLERS for s in samplers)):
    _err('samplers', samplers, f'a non-empty subset of {SAMPLERS}')
  _positive_ints('teacher_steps', e.teacher_steps, allow_empty='teacher' not in models)
  _positive_ints('teacher_ddim_steps', e.teacher_ddim_steps,
                 allow_empty='teacher_ddim' not in models)
  _positive_ints('student_steps', e.student_steps, allow_empty=True)
  if e.feature_net not in FEATURE_NETS:
    _err('feature_net', e.feature_net, f'one of {FEATURE_NETS}')
  if feature_net_kind(e.feature_net, config.data.name) == 'inception' and not e.inception_weights:
    _err('inception_weights', e.inception_weights,
         f'the path of the FID Inception-v3 weights (.pth or .npz; see '
         f'gdistill/eval/inception.py): eval.feature_net={e.feature_net!r} uses Inception '
         f'for data.name={config.data.name!r}; or leave \'eval\' out of --config.stages')
  if not isinstance(e.reference_split, str) or not e.reference_split:
    _err('reference_split', e.reference_split, 'a split name such as train')
  if not isinstance(e.floor_split, str):
    _err('floor_split', e.floor_split, 'a split name such as test, or "" for data.eval_split')
