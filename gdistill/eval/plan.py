"""Which settings the evaluation sweep runs: a pure function of the eval config.

A setting is (model, steps, sampler, w). NFE is counted as the paper does
(METHOD.md section 8): a guided teacher step costs 2 network evaluations, a
distilled student step 1 (``gdistill.methods`` owns the modes and their NFE). Which
model serves which sampler at which step count is the run plan's
(``gdistill.run_plan.PhaseSpec.serves``: the stochastic sampler at N steps is served by
the N/2-step student, multistep consistency sampling at every N by the consistency
student).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from gdistill import methods
from gdistill.run_plan import PhaseSpec

MODELS = methods.ROW_MODELS  # teacher, teacher_ddim, student, consistency
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
      (the same sampler at few steps: the baseline), ``student`` (progressive
      distillation) or ``consistency`` (consistency distillation).
    steps: sampling steps N.
    sampler: ``ddim``, ``stochastic`` or ``consistency``.
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
    """The ``compiled_samplers.make_sample_fn`` mode."""
    return methods.mode_of_row(self.model)

  @property
  def nfe(self) -> int:
    return methods.nfe(self.mode, self.steps)

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
               students: Sequence[PhaseSpec], samplers: Sequence[str], expensive_nfe: int = 0,
               expensive_w: Sequence[float] = ()) -> list[Setting]:
  """The sweep's settings, cheapest model first and grouped by checkpoint.

  Args:
    w_values: guidance weights of every row.
    models: subset of MODELS to run.
    teacher_steps: step counts of the guided-DDIM teacher reference rows.
    teacher_ddim_steps: few-step counts of the teacher baseline (a count also in
      ``teacher_steps`` is run once, as ``teacher``).
    students: the distilled phases to evaluate (stage-2 and consistency students); each
      gives a row for every (sampler, steps) it serves (``PhaseSpec.serves``), a stage-2
      student's only for the samplers of ``samplers``.
    samplers: samplers of the stage-2 student rows.
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

  for spec in sorted(students, key=lambda p: (p.student_steps is None, p.student_steps or 0)):
    model = spec.method.row_model
    if model not in models:
      continue
    for sampler, steps in spec.serves:
      if spec.kind != methods.STAGE2 or sampler in samplers:  # a stage-2 row: if asked
        add(model, steps, sampler, spec.name)
  reference = sorted(set(_ints(teacher_steps))) if 'teacher' in models else []
  if 'teacher_ddim' in models:
    for n in sorted(set(_ints(teacher_ddim_steps)) - set(reference)):
      add('teacher_ddim', n, 'ddim', 'teacher')
  for n in reference:
    add('teacher', n, 'ddim', 'teacher')
  return out


def plan_from_config(eval_config, students: Sequence[PhaseSpec]) -> list[Setting]:
  """``build_plan`` with the eval section's keys.

  ``students``: the finished distilled phases; the config's ``student_steps`` (empty:
  all) selects among the stage-2 students (a stochastic-sampler student by the 2N steps it
  samples with) and the consistency student's step counts.
  """
  e = eval_config
  wanted = set(_ints(e.student_steps))
  chosen = []
  for p in students:
    if p.student_steps is None and p.sample_steps:  # one model, many step counts
      steps = tuple(n for n in p.sample_steps if not wanted or n in wanted)
      if steps:
        chosen.append(dataclasses.replace(p, sample_steps=steps))
    elif not wanted or (2 * p.student_steps if p.kind == methods.STOCHASTIC  # its sampler's
                        else p.student_steps) in wanted:
      chosen.append(p)
  return build_plan(w_values=e.w_values, models=e.models, teacher_steps=e.teacher_steps,
                    teacher_ddim_steps=e.teacher_ddim_steps, students=chosen,
                    samplers=e.samplers, expensive_nfe=e.expensive_nfe,
                    expensive_w=e.expensive_w)


def feature_net_kind(feature_net: str, dataset: str) -> str:
  """``auto`` -> ``classifier`` for MNIST-like data (Inception features of 28x28
  grayscale images mean little), ``inception`` otherwise."""
  if feature_net != 'auto':
    return feature_net
  return 'classifier' if dataset.split('/')[0].split(':')[0] in CLASSIFIER_DATASETS \
      else 'inception'
