"""The stochastic sampler's dedicated students (``stage2.stochastic``, the paper's way).

The plan: for the stochastic sampler at 2N steps, an N-step student ``stage2s_nNNNN`` that
distils the 2N-step DDIM student (stage 1 at ``stage2.start_steps``) on the 1/(2N) grid,
starting from a copy of the N-step DDIM student; it serves that sampler (before any merged
student) and nothing else. Its loss is stage 2's on the ``both`` grid with its own
section's settings. Bad settings fail validation naming the key. The run: the smoke
config with DDIM-only halvings and stochastic students at 8 and 4 steps trains them after
the halvings, writes their grids and their report rows, and ``gdistill.sample
--sampler=stochastic`` samples with them (tests/test_methods_run.py, one run with the
consistency phase).
"""

import pytest

from gdistill import losses, methods, run_plan
from gdistill.config_base import base_config
from gdistill.config_validation import ConfigError, validate



def test_plan_chains_each_stochastic_student_to_its_ddim_students():
  plan = run_plan.build(stage2_start=8, stage2_min=2, stage2_fine_grid=False,
                        stochastic=(4, 8))
  assert plan.names == ['teacher', 'stage1', 'stage2_n0004', 'stage2_n0002',
                        'stage2s_n0004', 'stage2s_n0002']
  s8, s4 = plan['stage2s_n0004'], plan['stage2s_n0002']
  assert (s8.teacher, s8.init_from, s8.start_from) == ('stage1', 'stage2_n0004', 'stage2_n0004')
  assert (s4.teacher, s4.init_from) == ('stage2_n0004', 'stage2_n0002')
  assert s8.serves == (('stochastic', 8),) and s4.serves == (('stochastic', 4),)
  assert plan['stage2_n0004'].serves == (('ddim', 4),)
  assert plan.student_for('stochastic', 8).name == 'stage2s_n0004'
  assert plan.student_for('ddim', 4).name == 'stage2_n0004'
  assert plan.stochastic_steps() == [8, 4]
  assert s8.stage == 'stage2' and s8.method.section == 'stage2.stochastic'
  # init='teacher': a copy of the 2N-step DDIM student, the progressive-distillation start.
  t = run_plan.build(stage2_start=8, stage2_min=2, stage2_fine_grid=False, stochastic=(4,),
                     stochastic_init='teacher')['stage2s_n0002']
  assert (t.teacher, t.init_from, t.start_from) == ('stage2_n0004', None, 'stage2_n0004')
  # A workdir's phases give the same serving.
  found = run_plan.from_names(plan.names, stage2_fine_grid=False)
  assert found.student_for('stochastic', 4).name == 'stage2s_n0002'
  assert run_plan.parse_phase_name('stage2s_n0004') == (methods.STOCHASTIC, 4)


def test_a_dedicated_student_serves_before_a_merged_one():
  plan = run_plan.build(stage2_start=8, stage2_min=2, stage2_fine_grid=True, stochastic=(8,))
  assert ('stochastic', 8) in plan['stage2_n0004'].serves  # merged, trained on both grids
  assert plan.student_for('stochastic', 8).name == 'stage2s_n0004'
  assert plan.student_for('stochastic', 4).name == 'stage2_n0002'


def test_loss_is_stage2s_on_the_fine_grid_with_its_own_settings():
  c = base_config()
  c.stage2.update(time_grid='deterministic', w_min_frac=0.0, w_balance=False)
  c.stage2.stochastic.update(sampler_steps=(8,), w_min_frac=0.25, w_balance=True,
                             weighting='snr')
  spec = run_plan.from_config(c)['stage2s_n0004']
  loss, frozen = spec.method.bind_loss(c, None, spec)
  assert loss.func is losses.stage2_loss and frozen == {}
  assert loss.keywords['grid'] == 'both'
  assert (loss.keywords['w_min_frac'], loss.keywords['w_balance'],
          loss.keywords['weighting']) == (0.25, True, 'snr')
  ddim, _ = methods.method(methods.STAGE2).bind_loss(c, None, run_plan.from_config(c)[
      'stage2_n0004'])
  assert ddim.keywords['grid'] == 'deterministic' and ddim.keywords['w_min_frac'] == 0.0


@pytest.mark.parametrize('update, key', [
    (dict(sampler_steps=(6,)), 'stage2.stochastic.sampler_steps'),
    (dict(sampler_steps=(128,)), 'stage2.stochastic.sampler_steps'),
    (dict(sampler_steps=(2,)), 'stage2.stochastic.sampler_steps'),  # no 1-step DDIM student
    (dict(sampler_steps=(8,), init='stage1'), 'stage2.stochastic.init'),
    (dict(sampler_steps=(8,), learning_rate=-1.0), 'stage2.stochastic.learning_rate'),
])
def test_bad_settings_name_the_key(update, key):
  c = base_config()
  c.data.name = 'fashion_mnist'
  c.stage2.update(time_grid='deterministic', start_steps=64, min_steps=2)
  c.stage2.stochastic.update(update)
  with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
    validate(c, image_shape=(28, 28, 1), num_devices=1)


def test_merged_students_and_dedicated_ones_are_refused_together():
  c = base_config()
  c.data.name = 'fashion_mnist'
  c.stage2.stochastic.sampler_steps = (8,)
  assert c.stage2.time_grid == 'both'
  with pytest.raises(ConfigError, match="time_grid='deterministic'"):
    validate(c, image_shape=(28, 28, 1), num_devices=1)
