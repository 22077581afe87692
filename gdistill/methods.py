"""The registry of phase kinds: what each kind of phase is, in one place.

A kind declares the ``config.stages`` entry that trains it, its config section, how
its network starts, how it samples (the compiled sampler's mode and the samplers it
serves), its network evaluations per step, its report label and the evaluation rows'
model name. The run plan, the phase builder, the evaluation plan, the report, the plots
and the sample / translate commands read it: adding a distillation method is one module
(its loss and, if new, its sampler) and one entry here.

Sampling modes (``gdistill.compiled_samplers.make_sample_fn``): ``guided`` (the
classifier-free-guided teacher, 2 network evaluations a step), ``student`` (a
w-conditioned network, 1), ``conditional`` (the teacher without guidance, 1) and
``consistency`` (a w-conditioned consistency function, its boundary condition built in, 1).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

TEACHER, STAGE1, STAGE2, ENCODER, CONSISTENCY = (
    'teacher', 'stage1', 'stage2', 'encoder', 'consistency')

# Network evaluations of one sampling step, by mode: the one owner of NFE.
NFE_PER_STEP = {'guided': 2, 'student': 1, 'conditional': 1, 'consistency': 1}


@dataclasses.dataclass(frozen=True)
class Method:
  """One kind of phase.

  Attributes:
    kind: the phase kind (``run_plan.PhaseSpec.kind``).
    stage: the ``config.stages`` entry that trains it.
    section: its config section (dotted).
    prefix: name prefix of its phases, one per student step count (``stage2_n``);
      '' for a kind with one phase named ``kind``.
    init: how its network starts: ``fresh`` (random), ``teacher_net`` (the teacher's
      weights plus a zero-initialised w branch), ``copy`` (a copy of the phase it starts
      from).
    mode: its sampling mode ('' for encoders, which do not sample).
    row_model: the evaluation rows' model name of its samples ('' for none).
    label: how the report and the plots name it.
    uses_w: whether its network takes the guidance weight w.
  """
  kind: str
  stage: str
  section: str
  prefix: str
  init: str
  mode: str
  row_model: str
  label: str
  uses_w: bool = True

  @property
  def nfe_per_step(self) -> int:
    return NFE_PER_STEP[self.mode] if self.mode else 1


METHODS = {m.kind: m for m in (
    Method(TEACHER, 'teacher', 'teacher', '', 'fresh', 'guided', 'teacher',
           'guided teacher', uses_w=False),
    Method(STAGE1, 'stage1', 'stage1', '', 'teacher_net', 'student', '', 'stage-1 student'),
    Method(STAGE2, 'stage2', 'stage2', 'stage2_n', 'copy', 'student', 'student',
           'progressive distillation'),
    Method(CONSISTENCY, 'consistency', 'consistency', '', 'copy', 'consistency', 'consistency',
           'consistency distillation'),
    Method(ENCODER, 'translate', 'translate.encoder', 'encoder_n', 'copy', '', '',
           'distilled encoder'),
)}
KINDS = tuple(METHODS)

# Evaluation row models: the teacher's reference and few-step baseline rows, then each
# distillation method's (in the report's order).
ROW_MODELS = ('teacher', 'teacher_ddim') + tuple(
    m.row_model for m in METHODS.values() if m.row_model and m.kind != TEACHER)
_ROW_MODE = {'teacher_ddim': 'guided',
             **{m.row_model: m.mode for m in METHODS.values() if m.row_model}}


def method(kind: str) -> Method:
  if kind not in METHODS:
    raise ValueError(f'phase kind {kind!r}: expected one of {KINDS}')
  return METHODS[kind]


def mode_of_row(model: str) -> str:
  """The sampling mode of an evaluation row's model (``teacher``, ``student``, ...)."""
  if model not in _ROW_MODE:
    raise ValueError(f'model {model!r}: expected one of {ROW_MODELS}')
  return _ROW_MODE[model]


def nfe(mode: str, steps: int) -> int:
  """Network evaluations of ``steps`` sampling steps in ``mode``."""
  return int(steps) * NFE_PER_STEP[mode]


def is_teacher_row(model: str) -> bool:
  """Whether an evaluation row samples the guided teacher (reference or baseline)."""
  return mode_of_row(model) == 'guided'


def kind_of_row(model: str) -> Optional[str]:
  """The phase kind whose models an evaluation row samples (None for the teacher's)."""
  for m in METHODS.values():
    if m.row_model == model and m.kind != TEACHER:
      return m.kind
  return None


def section(config, kind: str):
  """The config section of a kind (``translate.encoder`` for encoders)."""
  out = config
  for part in method(kind).section.split('.'):
    out = out[part]
  return out
