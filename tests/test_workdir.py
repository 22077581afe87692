"""The workdir's config record: what a rerun may change."""

import json

import pytest

from gdistill.config_base import base_config
from gdistill.workdir import WorkdirError, check_config, record_config


def _recorded(tmp_path, **teacher):
  config = base_config()
  config.teacher.update(num_steps=100, **teacher)
  record_config(config, str(tmp_path))
  return config


def _forget(tmp_path, section, key):
  """Rewrites the record as a gdistill before ``section.key`` existed wrote it."""
  with open(tmp_path / 'config.json') as f:
    recorded = json.load(f)
  del recorded[section][key]
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(recorded, f)


def test_a_constant_schedule_phase_may_be_trained_longer(tmp_path):
  config = _recorded(tmp_path, lr_decay='constant')
  config.teacher.num_steps = 300
  check_config(config, str(tmp_path))  # accepted: the phase resumes from its last checkpoint
  record_config(config, str(tmp_path))
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['teacher']['num_steps'] == 300  # the record follows
  config.teacher.num_steps = 200  # but never back below what was recorded
  with pytest.raises(WorkdirError, match='teacher.num_steps=300'):
    check_config(config, str(tmp_path))


def test_a_decaying_schedule_phase_may_not(tmp_path):
  config = _recorded(tmp_path, lr_decay='linear')
  config.teacher.num_steps = 300
  with pytest.raises(WorkdirError, match='teacher.num_steps=100'):
    check_config(config, str(tmp_path))


def test_tracking_settings_are_free_to_change(tmp_path):
  config = _recorded(tmp_path)
  config.track.enabled = not config.track.enabled
  config.track.teacher_every = 7
  check_config(config, str(tmp_path))


def test_a_record_from_before_a_key_existed_still_matches(tmp_path):
  """config.json of a run recorded before teacher.ema_warmup existed: the same run with
  the key at its old behaviour (False) resumes; with it on, it is another run."""
  config = _recorded(tmp_path)
  _forget(tmp_path, 'teacher', 'ema_warmup')
  check_config(config, str(tmp_path))
  config.teacher.ema_warmup = True
  with pytest.raises(WorkdirError, match='teacher.ema_warmup'):
    check_config(config, str(tmp_path))


def test_a_record_from_before_the_stochastic_students_section(tmp_path):
  """A workdir recorded before stage2.stochastic existed never trained those students: it
  takes any values there, records the section when a run with stage2 first has it, and
  from then on holds it like any other."""
  config = _recorded(tmp_path)
  _forget(tmp_path, 'stage2', 'stochastic')
  config.stage2.stochastic.sampler_steps = (8, 4)
  config.stages = ('eval',)
  check_config(config, str(tmp_path))
  record_config(config, str(tmp_path))  # no stage2 in this run: the record stays as it was
  assert 'stochastic' not in json.load(open(tmp_path / 'config.json'))['stage2']
  config.stages = ('stage2', 'eval')
  check_config(config, str(tmp_path))
  record_config(config, str(tmp_path))
  assert json.load(open(tmp_path / 'config.json'))['stage2']['stochastic']['sampler_steps'] == [
      8, 4]
  config.stage2.stochastic.sampler_steps = (8,)
  with pytest.raises(WorkdirError, match='stage2.stochastic.sampler_steps'):
    check_config(config, str(tmp_path))


def test_a_refusal_names_every_difference_and_the_flags_that_resume(tmp_path):
  """A changed default (here stage 2's) is refused once, with every key that differs and
  the overrides that give the recorded run's values back."""
  config = _recorded(tmp_path)
  config.stage2.w_min_frac = 0.25
  config.stage2.stochastic.sampler_steps = (8, 4)
  with pytest.raises(WorkdirError) as e:
    check_config(config, str(tmp_path))
  message = str(e.value)
  assert 'stage2.stochastic.sampler_steps=[], stage2.w_min_frac=0.0 but' in message
  assert ('(--config.stage2.stochastic.sampler_steps="()" --config.stage2.w_min_frac="0.0")'
          in message)
  config.stage2.w_min_frac = 0.0
  config.stage2.stochastic.sampler_steps = ()
  check_config(config, str(tmp_path))
