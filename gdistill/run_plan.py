"""The plan of a run: every phase a config produces, derived from the config once.

A phase is one training run of the loop, saved under ``workdir/checkpoints/<name>``:

  teacher          the classifier-free-guided teacher (guided DDIM, 2 evaluations a step);
  stage1           the w-conditioned student that matches the guided teacher;
  stage2_nNNNN     the N-step student of progressive distillation (one per halving);
  stage2s_nNNNN    the N-step student for the stochastic sampler at 2N steps (optional);
  encoder_nNNNN    the N-step distilled DDIM encoder (for translation);
  consistency      guided consistency distillation's student (multistep sampling, any N).

Each phase knows its kind, its student step count, which phase is its teacher (the
frozen model it distils) and which samplers and step counts it serves. The driver,
the config validation, the evaluation sweep, the sample and translate commands and
the notebook all read this plan: nothing else computes halvings or phase names.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Optional, Sequence

from gdistill import methods
from gdistill.methods import (  # ANY: re-exported, the step count "any" of `serves`
    ANY, CONSISTENCY, ENCODER, KINDS, STAGE1, STAGE2, STOCHASTIC, TEACHER)

_PREFIX = {k: m.prefix for k, m in methods.METHODS.items() if m.prefix}
_SINGLE = tuple(k for k, m in methods.METHODS.items() if not m.prefix)
_NAME = re.compile(r'^(%s)(\d{4,})$' % '|'.join(re.escape(p) for p in _PREFIX.values()))
_KIND_OF_PREFIX = {p: k for k, p in _PREFIX.items()}
# The step counts a consistency student is evaluated at when no config says otherwise.
CONSISTENCY_STEPS = (1, 2, 4, 8)


def phase_name(kind: str, student_steps: Optional[int] = None) -> str:
  """``teacher``, ``stage1``, ``consistency``, ``stage2_n0004``, ``encoder_n0008``."""
  if kind in _SINGLE:
    return kind
  if kind not in _PREFIX or not isinstance(student_steps, int) or student_steps < 1:
    raise ValueError(f'phase_name({kind!r}, {student_steps!r}): expected a kind of {KINDS} '
                     f'and, for {"/".join(_PREFIX)}, a positive step count')
  return f'{_PREFIX[kind]}{student_steps:04d}'


def parse_phase_name(name: str) -> Optional[tuple[str, Optional[int]]]:
  """(kind, student steps) of a phase directory's name, or None if it names no phase."""
  if name in _SINGLE:
    return name, None
  m = _NAME.match(name)
  return (_KIND_OF_PREFIX[m.group(1)], int(m.group(2))) if m else None


def halvings(start_steps: int, min_steps: int) -> list[int]:
  """Student step counts of successive halvings, e.g. start 64, min 1 -> [32, 16, ..., 1]."""
  out, n = [], start_steps // 2
  while n >= min_steps:
    out.append(n)
    n //= 2
  return out


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
  """One phase of a run.

  Attributes:
    name: checkpoint directory name.
    kind: one of KINDS.
    student_steps: steps the phase's model samples (stage2) or encodes (encoder) in;
      None for the teacher and stage 1 (any step count).
    teacher: name of the phase whose model this one distils (frozen while it trains);
      None for the teacher.
    stage: the ``config.stages`` entry that trains it (``translate`` for encoders).
    fine_grid: a stage-2 student trained on the 1/(2N) grid (``stage2.time_grid='both'``),
      so it also serves the stochastic sampler at 2N steps.
    init_from: the phase whose parameters it starts from, when not ``teacher`` (a
      consistency student that starts from stage 1 but distils the guided teacher).
    sample_steps: the step counts a consistency student samples with.
  """
  name: str
  kind: str
  student_steps: Optional[int]
  teacher: Optional[str]
  stage: str
  fine_grid: bool = True
  init_from: Optional[str] = None
  sample_steps: tuple[int, ...] = ()

  @property
  def method(self) -> methods.Method:
    return methods.method(self.kind)

  @property
  def start_from(self) -> Optional[str]:
    """The phase whose parameters it starts from (None: random)."""
    return self.init_from or self.teacher

  def section(self, config):
    """The config section that trains it (``teacher``, ``stage1``, ``stage2``,
    ``consistency``, ``translate.encoder``)."""
    return methods.section(config, self.kind)

  def num_steps(self, config) -> int:
    """Its training steps: the section's ``num_steps``, or the section's
    ``num_steps_for`` entry for this phase's student step count."""
    s = self.section(config)
    return dict(s.get('num_steps_for', ())).get(self.student_steps, s.num_steps)

  @property
  def use_w(self) -> bool:
    """Whether the network takes the guidance weight w as an input."""
    return self.method.uses_w

  @property
  def mode(self) -> str:
    """How it samples (``methods``): ``guided`` (2 evaluations a step), ``student`` or
    ``consistency`` (1)."""
    return self.method.mode or 'student'

  @property
  def serves(self) -> tuple[tuple[str, Optional[int]], ...]:
    """(sampler, steps) it samples with; steps ANY: every step count (``methods``)."""
    return self.method.serves(self)


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """The phases of a run in training order."""
  phases: tuple[PhaseSpec, ...]

  def __getitem__(self, name: str) -> PhaseSpec:
    for p in self.phases:
      if p.name == name:
        return p
    raise KeyError(name)

  def __contains__(self, name: str) -> bool:
    return any(p.name == name for p in self.phases)

  @property
  def names(self) -> list[str]:
    return [p.name for p in self.phases]

  def of_kind(self, kind: str) -> list[PhaseSpec]:
    return [p for p in self.phases if p.kind == kind]

  @property
  def student_steps(self) -> list[int]:
    """Step counts of the distilled (stage-2) students, largest first."""
    return [p.student_steps for p in self.of_kind(STAGE2)]

  @property
  def encoder_steps(self) -> list[int]:
    """Step counts of the distilled encoders, largest first."""
    return [p.student_steps for p in self.of_kind(ENCODER)]

  def student_for(self, sampler: str, steps: int) -> Optional[PhaseSpec]:
    """The progressive-distillation student that serves ``sampler`` at ``steps`` (a
    dedicated stochastic-sampler student before a stage-2 one), or None."""
    for p in self.of_kind(STOCHASTIC) + self.of_kind(STAGE2):
      if (sampler, steps) in p.serves:
        return p
    return None

  def encoder_for(self, steps: int) -> Optional[PhaseSpec]:
    """The distilled encoder of ``steps`` steps, or None."""
    for p in self.of_kind(ENCODER):
      if p.student_steps == steps:
        return p
    return None

  def distilled(self) -> list[PhaseSpec]:
    """The phases whose models the evaluation rows sample besides the teacher's
    (stage-2 students, consistency students), in plan order."""
    return [p for p in self.phases if p.kind != TEACHER and p.method.row_model]

  def stochastic_steps(self) -> list[int]:
    """Step counts the stochastic sampler is served at by a distilled student."""
    return sorted({n for p in self.of_kind(STOCHASTIC) + self.of_kind(STAGE2)
                   for s, n in p.serves if s == 'stochastic'}, reverse=True)

  def training(self, stages: Iterable[str], *, external_teacher: bool) -> list[PhaseSpec]:
    """The phases a run with ``config.stages`` trains (or resumes), in order."""
    stages = set(stages)
    return [p for p in self.phases if p.stage in stages
            and not (p.kind == TEACHER and external_teacher)]


def _chain(kind: str, counts: list[int], first_teacher: str, stage: str,
           fine_grid: bool = True) -> list[PhaseSpec]:
  out, teacher = [], first_teacher
  for n in counts:
    out.append(PhaseSpec(phase_name(kind, n), kind, n, teacher, stage, fine_grid))
    teacher = out[-1].name
  return out


def consistency_phase(*, solver: str = STAGE1, init: str = STAGE1,
                      sample_steps: Sequence[int] = CONSISTENCY_STEPS) -> PhaseSpec:
  """The consistency student: distils ``solver``'s guided DDIM steps (``teacher`` or
  ``stage1``), starts from ``init``'s parameters, samples at ``sample_steps``."""
  return PhaseSpec(CONSISTENCY, CONSISTENCY, None, solver, 'consistency',
                   init_from=None if init == solver else init,
                   sample_steps=tuple(int(n) for n in sample_steps))


def stochastic_phase(sampler_steps: int, *, init: str = 'ddim',
                     stage2_start: Optional[int] = None) -> PhaseSpec:
  """The dedicated student of the stochastic sampler at ``sampler_steps`` = 2N steps: an
  N-step student that distils the 2N-step DDIM student (stage 1 when 2N is
  ``stage2_start``) on the 1/(2N) grid, starting from a copy of the N-step DDIM student
  (``init='ddim'``) or of its teacher (``init='teacher'``)."""
  n = sampler_steps // 2
  teacher = STAGE1 if sampler_steps == stage2_start else phase_name(STAGE2, sampler_steps)
  return PhaseSpec(phase_name(STOCHASTIC, n), STOCHASTIC, n, teacher, 'stage2',
                   init_from=phase_name(STAGE2, n) if init == 'ddim' else None)


def build(*, stage2_start: int, stage2_min: int, encoder_start: Optional[int] = None,
          encoder_min: Optional[int] = None, stage2_fine_grid: bool = True,
          consistency: Optional[PhaseSpec] = None, stochastic: Sequence[int] = (),
          stochastic_init: str = 'ddim') -> RunPlan:
  """The plan of halvings: stage-2 students from ``stage2_start`` (the stage-1 model
  sampled at that many steps is their first teacher) down to ``stage2_min``, trained on
  the finer grid unless ``stage2_fine_grid`` is False; then the dedicated students of the
  stochastic sampler at each of ``stochastic`` steps (``stochastic_phase``); then
  ``consistency`` (a ``consistency_phase``), if given; with ``encoder_start``, distilled
  encoders likewise."""
  phases = [PhaseSpec(TEACHER, TEACHER, None, None, 'teacher'),
            PhaseSpec(STAGE1, STAGE1, None, TEACHER, 'stage1')]
  phases += _chain(STAGE2, halvings(stage2_start, stage2_min), STAGE1, 'stage2',
                   stage2_fine_grid)
  phases += [stochastic_phase(int(n), init=stochastic_init, stage2_start=stage2_start)
             for n in sorted(set(stochastic), reverse=True)]
  if consistency is not None:
    phases.append(consistency)
  if encoder_start is not None:
    phases += _chain(ENCODER, halvings(encoder_start, encoder_min), STAGE1, 'translate')
  return RunPlan(tuple(phases))


def from_config(config) -> RunPlan:
  """The plan of a config: its stage-2 halvings, the stochastic sampler's students
  (``stage2.stochastic.sampler_steps``), the consistency student when
  ``config.stages`` has ``consistency`` and, when translation distils an encoder
  (``translate.distill_encoder``), the encoder halvings."""
  t = config.get('translate')
  distill = t is not None and t.get('distill_encoder', False)
  cd = config.get('consistency')
  consistency = None
  if CONSISTENCY in tuple(config.get('stages', ())) and cd is not None:
    consistency = consistency_phase(solver=cd.solver, init=cd.init,
                                    sample_steps=cd.sample_steps)
  st = config.stage2.get('stochastic')
  return build(stage2_start=config.stage2.start_steps, stage2_min=config.stage2.min_steps,
               encoder_start=t.encoder_start_steps if distill else None,
               encoder_min=t.encoder_min_steps if distill else None,
               stage2_fine_grid=fine_grid(config), consistency=consistency,
               stochastic=tuple(st.sampler_steps) if st is not None else (),
               stochastic_init=st.init if st is not None else 'ddim')


def fine_grid(config) -> bool:
  """Whether a config's stage-2 students learn the stochastic sampler's grid too."""
  return config.stage2.get('time_grid', 'both') == 'both'


def from_names(names: Iterable[str], stage2_fine_grid: bool = True) -> RunPlan:
  """The plan of the phases found in a workdir (directory names; others ignored),
  each halving chained to the next larger one found; stage-2 students trained on the
  finer grid unless ``stage2_fine_grid`` is False."""
  parsed = sorted((parse_phase_name(n) for n in names if parse_phase_name(n)),
                  key=lambda kn: (KINDS.index(kn[0]), -(kn[1] or 0)))
  phases, previous = [], {STAGE2: STAGE1, ENCODER: STAGE1}
  for kind, n in parsed:
    name = phase_name(kind, n)
    if kind == TEACHER:
      phases.append(PhaseSpec(name, kind, None, None, 'teacher'))
    elif kind == STAGE1:
      phases.append(PhaseSpec(name, kind, None, TEACHER, 'stage1'))
    elif kind == CONSISTENCY:
      phases.append(consistency_phase())
    elif kind == STOCHASTIC:  # what it serves is all a found plan needs
      phases.append(stochastic_phase(2 * n))
    else:
      phases.append(PhaseSpec(name, kind, n, previous[kind],
                              'stage2' if kind == STAGE2 else 'translate', stage2_fine_grid))
      previous[kind] = name
  return RunPlan(tuple(phases))
