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
import importlib
from typing import Callable, Optional

TEACHER, STAGE1, STAGE2, STOCHASTIC, ENCODER, CONSISTENCY = (
    'teacher', 'stage1', 'stage2', 'stage2s', 'encoder', 'consistency')
ANY = None  # a ``serves`` step count: any number of steps

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
    serves: ``serves(spec) -> ((sampler, steps), ...)``: what its model samples with
      (steps ANY: every step count; sampler ``encode`` for encoders).
    loss: ``'module:function'``, the binder of its loss:
      ``function(config, store, spec) -> (loss, frozen scalars)``, the loss bound to all
      but the student (``gdistill.phases``); '' for the teacher (its own phase).
    grids: ``grids(config, spec) -> [(w, steps), ...]``: the sample grids written when
      it finishes (sampled with ``sampler``).
    sampler: the sampler of its grids and in-training quality ('' : none).
    track_steps: ``track_steps(config, spec) -> steps`` its in-training quality samples
      with; None: not tracked.
    meta: ``meta(config, spec) -> dict``: what its checkpoint meta adds.
    pass_target: its loss reads the EMA (target) parameters.
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
  serves: Callable
  loss: str = ''
  grids: Callable = lambda config, spec: []
  sampler: str = ''
  track_steps: Optional[Callable] = None
  meta: Callable = lambda config, spec: {}
  pass_target: bool = False
  uses_w: bool = True

  def bind_loss(self, config, store, spec):
    """Its loss bound to all but the student, and the frozen scalars it reads."""
    module, _, name = self.loss.partition(':')
    return getattr(importlib.import_module(module), name)(config, store, spec)

  @property
  def nfe_per_step(self) -> int:
    return NFE_PER_STEP[self.mode] if self.mode else 1


# ---- what each kind serves, samples and tracks (``spec``: a ``run_plan.PhaseSpec``) ----

def _any_steps(spec):  # the teacher and stage 1: every sampler at every step count
  del spec
  return (('ddim', ANY), ('stochastic', ANY))


def _halving(spec):
  """A stage-2 student serves DDIM at its N steps and, trained on the 1/(2N) grid too
  (``stage2.time_grid='both'``), the stochastic sampler at 2N steps (METHOD.md section 5)."""
  stochastic = (('stochastic', 2 * spec.student_steps),) if spec.fine_grid else ()
  return (('ddim', spec.student_steps),) + stochastic


def _stochastic(spec):  # a dedicated stochastic-sampler student: its 2N steps only
  return (('stochastic', 2 * spec.student_steps),)


def _multistep(spec):  # multistep consistency sampling at its step counts
  return tuple(('consistency', n) for n in spec.sample_steps)


def _encode(spec):
  return (('encode', spec.student_steps),)


def _per_w(config, steps):
  return [(float(w), int(n)) for w in config.samples.student_w for n in steps]


def _teacher_grids(config, spec):
  del spec
  s = config.samples
  return [(w, s.teacher_steps) for w in sorted({0.0, s.teacher_w})]


def _consistency_meta(config, spec):
  from gdistill import consistency  # pylint: disable=g-import-not-at-top
  del config
  return {'consistency': {'solver': spec.teacher, 'sample_steps': list(spec.sample_steps),
                          'sigma_data': consistency.SIGMA_DATA,
                          'boundary_scale': consistency.BOUNDARY_SCALE}}


def _encoder_meta(config, spec):
  del spec
  return {'encoder': True, 'encode_w': float(config.translate.encode_w)}


METHODS = {m.kind: m for m in (
    Method(TEACHER, 'teacher', 'teacher', '', 'fresh', 'guided', 'teacher',
           'guided teacher', _any_steps, grids=_teacher_grids, sampler='ddim',
           track_steps=lambda config, spec: config.track.steps, uses_w=False),
    # Sampled as the first halving's teacher: at stage2.start_steps.
    Method(STAGE1, 'stage1', 'stage1', '', 'teacher_net', 'student', '', 'stage-1 student',
           _any_steps, loss='gdistill.losses:bind_stage1',
           grids=lambda config, spec: _per_w(config, [config.stage2.start_steps]),
           sampler='ddim', track_steps=lambda config, spec: config.track.steps),
    Method(STAGE2, 'stage2', 'stage2', 'stage2_n', 'copy', 'student', 'student',
           'progressive distillation', _halving, loss='gdistill.losses:bind_stage2',
           grids=lambda config, spec: _per_w(config, [spec.student_steps]), sampler='ddim',
           track_steps=lambda config, spec: spec.student_steps),
    # Progressive distillation's students for the stochastic sampler, apart (the paper's
    # way): the N-step one fine-tunes a copy of the N-step DDIM student on the 1/(2N) grid
    # with the 2N-step student as its teacher, and serves the stochastic sampler at 2N.
    Method(STOCHASTIC, 'stage2', 'stage2.stochastic', 'stage2s_n', 'copy', 'student',
           'student', 'progressive distillation', _stochastic,
           loss='gdistill.losses:bind_stochastic',
           grids=lambda config, spec: _per_w(config, [2 * spec.student_steps]),
           sampler='stochastic', track_steps=lambda config, spec: 2 * spec.student_steps),
    Method(CONSISTENCY, 'consistency', 'consistency', '', 'copy', 'consistency', 'consistency',
           'consistency distillation', _multistep, loss='gdistill.consistency:bind_loss',
           grids=lambda config, spec: _per_w(config, spec.sample_steps), sampler='consistency',
           track_steps=lambda config, spec: (4 if 4 in spec.sample_steps
                                             else min(spec.sample_steps)),
           meta=_consistency_meta, pass_target=True),
    Method(ENCODER, 'translate', 'translate.encoder', 'encoder_n', 'copy', '', '',
           'distilled encoder', _encode, loss='gdistill.encoder:bind_loss',
           meta=_encoder_meta),
)}
KINDS = tuple(METHODS)

# Evaluation row models: the teacher's reference and few-step baseline rows, then each
# distillation method's (in the report's order).
ROW_MODELS = ('teacher', 'teacher_ddim') + tuple(dict.fromkeys(
    m.row_model for m in METHODS.values() if m.row_model and m.kind != TEACHER))
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
