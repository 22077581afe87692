"""The plan of a run: every phase a config produces, derived from the config once.

A phase is one training run of the loop, saved under ``workdir/checkpoints/<name>``:

  teacher          the classifier-free-guided teacher (guided DDIM, 2 evaluations a step);
  stage1           the w-conditioned student that matches the guided teacher;
  stage2_nNNNN     the N-step student of progressive distillation (one per halving);
  encoder_nNNNN    the N-step distilled DDIM encoder (for translation).

Each phase knows its kind, its student step count, which phase is its teacher (the
frozen model it distils) and which samplers and step counts it serves. The driver,
the config validation, the evaluation sweep, the sample and translate commands and
the notebook all read this plan: nothing else computes halvings or phase names.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Optional

TEACHER, STAGE1, STAGE2, ENCODER = 'teacher', 'stage1', 'stage2', 'encoder'
KINDS = (TEACHER, STAGE1, STAGE2, ENCODER)
_PREFIX = {STAGE2: 'stage2_n', ENCODER: 'encoder_n'}
_NAME = re.compile(r'^(stage2|encoder)_n(\d{4,})$')
ANY = None  # ``serves`` step count: any number of steps


def phase_name(kind: str, student_steps: Optional[int] = None) -> str:
  """``teacher``, ``stage1``, ``stage2_n0004``, ``encoder_n0008``."""
  if kind in (TEACHER, STAGE1):
    return kind
  if kind not in _PREFIX or not isinstance(student_steps, int) or student_steps < 1:
    raise ValueError(f'phase_name({kind!r}, {student_steps!r}): expected a kind of {KINDS} '
                     f'and, for stage2/encoder, a positive step count')
  return f'{_PREFIX[kind]}{student_steps:04d}'


def parse_phase_name(name: str) -> Optional[tuple[str, Optional[int]]]:
  """(kind, student steps) of a phase directory's name, or None if it names no phase."""
  if name in (TEACHER, STAGE1):
    return name, None
  m = _NAME.match(name)
  return (m.group(1), int(m.group(2))) if m else None


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
  """
  name: str
  kind: str
  student_steps: Optional[int]
  teacher: Optional[str]
  stage: str
  fine_grid: bool = True

  def section(self, config):
    """The config section that trains it (``teacher``, ``stage1``, ``stage2``,
    ``translate.encoder``)."""
    return config.translate.encoder if self.kind == ENCODER else config[self.kind]

  def num_steps(self, config) -> int:
    """Its training steps: the section's ``num_steps``, or the section's
    ``num_steps_for`` entry for this phase's student step count."""
    s = self.section(config)
    return dict(s.get('num_steps_for', ())).get(self.student_steps, s.num_steps)

  @property
  def use_w(self) -> bool:
    """Whether the network takes the guidance weight w as an input."""
    return self.kind != TEACHER

  @property
  def mode(self) -> str:
    """How it samples: ``guided`` (2 evaluations a step) or ``student`` (1)."""
    return 'guided' if self.kind == TEACHER else 'student'

  @property
  def serves(self) -> tuple[tuple[str, Optional[int]], ...]:
    """(sampler, steps) it samples with; steps ANY: every step count.

    The stochastic sampler at N steps jumps 2/N on the 1/N grid, which the
    N/2-step student learnt if trained on its finer grid (stage2.time_grid='both',
    METHOD.md section 5); one trained on its own grid only serves DDIM.
    """
    if self.kind in (TEACHER, STAGE1):
      return (('ddim', ANY), ('stochastic', ANY))
    if self.kind == STAGE2:
      stochastic = (('stochastic', 2 * self.student_steps),) if self.fine_grid else ()
      return (('ddim', self.student_steps),) + stochastic
    return (('encode', self.student_steps),)


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
    """The stage-2 student that serves ``sampler`` at ``steps``, or None."""
    for p in self.of_kind(STAGE2):
      if (sampler, steps) in p.serves:
        return p
    return None

  def encoder_for(self, steps: int) -> Optional[PhaseSpec]:
    """The distilled encoder of ``steps`` steps, or None."""
    for p in self.of_kind(ENCODER):
      if p.student_steps == steps:
        return p
    return None

  def stochastic_steps(self) -> list[int]:
    """Step counts the stochastic sampler is served at by a distilled student."""
    return [n for p in self.of_kind(STAGE2) for s, n in p.serves if s == 'stochastic']

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


def build(*, stage2_start: int, stage2_min: int, encoder_start: Optional[int] = None,
          encoder_min: Optional[int] = None, stage2_fine_grid: bool = True) -> RunPlan:
  """The plan of halvings: stage-2 students from ``stage2_start`` (the stage-1 model
  sampled at that many steps is their first teacher) down to ``stage2_min``, trained on
  the finer grid unless ``stage2_fine_grid`` is False; with ``encoder_start``, distilled
  encoders likewise."""
  phases = [PhaseSpec(TEACHER, TEACHER, None, None, 'teacher'),
            PhaseSpec(STAGE1, STAGE1, None, TEACHER, 'stage1')]
  phases += _chain(STAGE2, halvings(stage2_start, stage2_min), STAGE1, 'stage2',
                   stage2_fine_grid)
  if encoder_start is not None:
    phases += _chain(ENCODER, halvings(encoder_start, encoder_min), STAGE1, 'translate')
  return RunPlan(tuple(phases))


def from_config(config) -> RunPlan:
  """The plan of a config: its stage-2 halvings and, when translation distils an
  encoder (``translate.distill_encoder``), the encoder halvings."""
  t = config.get('translate')
  distill = t is not None and t.get('distill_encoder', False)
  return build(stage2_start=config.stage2.start_steps, stage2_min=config.stage2.min_steps,
               encoder_start=t.encoder_start_steps if distill else None,
               encoder_min=t.encoder_min_steps if distill else None,
               stage2_fine_grid=fine_grid(config))


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
    else:
      phases.append(PhaseSpec(name, kind, n, previous[kind],
                              'stage2' if kind == STAGE2 else 'translate', stage2_fine_grid))
      previous[kind] = name
  return RunPlan(tuple(phases))
