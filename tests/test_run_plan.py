"""The run plan (the one owner of phase names and step counts), the model store over
a workdir, and the shape of the module graph."""

import ast
import os

import pytest

import smoke_workdir
from gdistill import run_plan
from gdistill.config_base import base_config
from gdistill.model_store import ModelStore

GDISTILL = os.path.join(smoke_workdir.REPO, 'gdistill')


def _fashion_config():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'fm', os.path.join(smoke_workdir.REPO, 'configs', 'fashion_mnist.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_plan_of_the_embedded_default():
  config = _fashion_config()
  assert not config.translate.distill_encoder  # the stage-1 model encodes (32 DDIM steps)
  assert run_plan.from_config(config).encoder_steps == []
  config.translate.update(distill_encoder=True, encoder_start_steps=32, encoder_min_steps=4)
  plan = run_plan.from_config(config)
  assert plan.names == ['teacher', 'stage1', 'stage2_n0032', 'stage2_n0016', 'stage2_n0008',
                        'stage2_n0004', 'stage2_n0002', 'stage2_n0001', 'stage2s_n0004',
                        'stage2s_n0002', 'encoder_n0016', 'encoder_n0008', 'encoder_n0004']
  assert plan.student_steps == [32, 16, 8, 4, 2, 1] and plan.encoder_steps == [16, 8, 4]
  # Each halving distils the one before it; the first of each chain distils stage 1; the
  # stochastic sampler's 8- and 4-step students distil the 8- and 4-step DDIM students.
  assert [plan[n].teacher for n in plan.names] == [
      None, 'teacher', 'stage1', 'stage2_n0032', 'stage2_n0016', 'stage2_n0008', 'stage2_n0004',
      'stage2_n0002', 'stage2_n0008', 'stage2_n0004', 'stage1', 'encoder_n0016',
      'encoder_n0008']
  assert plan.student_for('stochastic', 8).name == 'stage2s_n0004'
  assert plan.student_for('stochastic', 4).name == 'stage2s_n0002'
  assert plan['teacher'].mode == 'guided' and not plan['teacher'].use_w
  assert plan['stage2_n0004'].mode == 'student' and plan['stage2_n0004'].use_w
  assert plan['encoder_n0008'].stage == 'translate'


def test_what_each_phase_serves():
  plan = run_plan.build(stage2_start=16, stage2_min=1)
  assert plan['stage2_n0004'].serves == (('ddim', 4), ('stochastic', 8))
  assert plan.student_for('ddim', 4).name == 'stage2_n0004'
  assert plan.student_for('stochastic', 8).name == 'stage2_n0004'  # the N/2-step student
  assert plan.student_for('stochastic', 2).name == 'stage2_n0001'
  assert plan.student_for('stochastic', 3) is None and plan.student_for('ddim', 16) is None
  assert sorted(plan.stochastic_steps()) == [2, 4, 8, 16]
  assert ('ddim', run_plan.ANY) in plan['teacher'].serves
  assert plan.encoder_for(4) is None  # no encoders without translate.distill_encoder


def test_students_of_the_deterministic_grid_serve_ddim_only():
  config = base_config()
  config.stage2.update(start_steps=16, min_steps=1, time_grid='deterministic')
  for plan in (run_plan.from_config(config),
               run_plan.from_names(['stage1', 'stage2_n0004', 'stage2_n0002'], False)):
    assert plan['stage2_n0004'].serves == (('ddim', 4),)
    assert plan.student_for('stochastic', 8) is None and plan.stochastic_steps() == []
    assert plan.student_for('ddim', 4).name == 'stage2_n0004'


def test_training_steps_of_each_halving():
  config = base_config()
  config.stage2.update(start_steps=16, min_steps=1, num_steps=300, num_steps_for=((2, 90), (1, 50)))
  plan = run_plan.from_config(config)
  steps = {p.name: p.num_steps(config) for p in plan.of_kind(run_plan.STAGE2)}
  assert steps == {'stage2_n0008': 300, 'stage2_n0004': 300, 'stage2_n0002': 90,
                   'stage2_n0001': 50}
  assert plan['stage1'].num_steps(config) == config.stage1.num_steps
  assert plan['teacher'].num_steps(config) == config.teacher.num_steps


def test_training_follows_the_stages():
  plan = run_plan.build(stage2_start=8, stage2_min=2, encoder_start=8, encoder_min=4)
  names = lambda stages, ext=False: [p.name for p in plan.training(stages, external_teacher=ext)]
  assert names(('teacher', 'stage1')) == ['teacher', 'stage1']
  assert names(('teacher', 'stage1', 'stage2'), ext=True) == ['stage1', 'stage2_n0004',
                                                              'stage2_n0002']
  assert names(('stage2', 'translate')) == ['stage2_n0004', 'stage2_n0002', 'encoder_n0004']
  assert names(('eval',)) == []


def test_names_round_trip_and_workdir_listings():
  assert run_plan.phase_name('stage2', 4) == 'stage2_n0004'
  assert run_plan.phase_name('encoder', 16) == 'encoder_n0016'
  assert run_plan.phase_name('teacher') == 'teacher'
  assert run_plan.parse_phase_name('stage2_n0004') == ('stage2', 4)
  assert run_plan.parse_phase_name('encoder_n0016') == ('encoder', 16)
  assert run_plan.parse_phase_name('stage1') == ('stage1', None)
  for junk in ('stage2_n4', 'stage3_n0004', 'tensorboard', 'stage2_n0004.orbax-checkpoint-tmp'):
    assert run_plan.parse_phase_name(junk) is None
  with pytest.raises(ValueError, match='phase_name'):
    run_plan.phase_name('stage2')
  assert run_plan.halvings(64, 1) == [32, 16, 8, 4, 2, 1]
  assert run_plan.halvings(32, 4) == [16, 8, 4]
  found = run_plan.from_names(['stage2_n0002', 'junk', 'teacher', 'stage2_n0004', 'stage1',
                               'encoder_n0002'])
  assert found.names == ['teacher', 'stage1', 'stage2_n0004', 'stage2_n0002', 'encoder_n0002']
  assert found['stage2_n0002'].teacher == 'stage2_n0004'
  assert found.student_for('stochastic', 4).name == 'stage2_n0002'


def test_store_of_a_workdir_in_the_layout_of_earlier_runs(tmp_path):
  """A workdir laid out as gdistill has always written it (checkpoint directories named
  by phase, meta in each) opens, and says what it holds."""
  path = smoke_workdir.fake_workdir(str(tmp_path / 'old'))
  store = ModelStore.open(path)
  assert list(store.finished()) == ['teacher', 'stage1', 'stage2_n0004', 'stage2_n0002',
                                    'encoder_n0004', 'encoder_n0002']
  assert store.image_shape == (28, 28, 1) and store.num_classes == 10
  assert store.student_steps() == [2, 4] and store.encoder_steps() == [2, 4]
  assert store.student_phase('stochastic', 8) == 'stage2_n0004'
  assert store.student_phase('ddim', 8) is None
  assert store.encoder_phase(2) == 'encoder_n0002'
  assert store.describe() == 'teacher; stage1; students for 2, 4 steps; encoders for 2, 4 steps'
  assert store.parse_class('sneaker', '--class') == 7


def test_store_resolves_an_external_teacher(tmp_path):
  teacher_run = smoke_workdir.fake_workdir(str(tmp_path / 'teacher_run'), phases=('teacher',))
  config = base_config()
  config.teacher_checkpoint = teacher_run
  store = ModelStore(str(tmp_path / 'run'), config, mesh=None, image_shape=(28, 28, 1),
                     num_classes=10, compile_options={})
  assert store.directory('teacher') == os.path.join(teacher_run, 'checkpoints', 'teacher')
  assert store.step('teacher') == 1 and store.step('stage1') is None
  assert list(store.finished()) == ['teacher']


# ---- the module graph -------------------------------------------------------------------

def _imports():
  """gdistill module -> the gdistill modules its ``import`` lines name (any depth)."""
  graph = {}
  for root, _, files in os.walk(GDISTILL):
    for name in files:
      if not name.endswith('.py'):
        continue
      path = os.path.join(root, name)
      rel = os.path.relpath(path, os.path.dirname(GDISTILL))[:-3].replace(os.sep, '.')
      module = rel[:-len('.__init__')] if rel.endswith('.__init__') else rel
      with open(path) as f:
        graph[module] = ast.parse(f.read())
  modules = set(graph)

  def deps(tree):
    out = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        out |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module:
        # ``from pkg import submodule`` depends on the submodule, not on pkg/__init__.
        subs = {f'{node.module}.{a.name}' for a in node.names} & modules
        out |= subs or {node.module}
    return out
  return {m: {d for d in deps(tree) if d in modules and d != m} for m, tree in graph.items()}


def test_module_graph_has_no_cycle():
  graph = _imports()
  assert 'gdistill.run_plan' in graph and 'gdistill.model_store' in graph
  state = {}

  def visit(m, path):
    state[m] = 'open'
    for d in sorted(graph[m]):
      if state.get(d) == 'open':
        pytest.fail('import cycle: ' + ' -> '.join(path[path.index(d):] + [d]))
      if d not in state:
        visit(d, path + [d])
    state[m] = 'done'

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])


def test_only_the_commands_import_the_driver():
  importers = sorted(m for m, deps in _imports().items() if 'gdistill.train' in deps)
  assert importers == ['gdistill.main'], importers


def test_one_owner_of_phase_names():
  """No module but the methods registry spells the stage-2 or encoder directory prefix."""
  owners = []
  for root, _, files in os.walk(GDISTILL):
    for name in files:
      if name.endswith('.py'):
        with open(os.path.join(root, name)) as f:
          text = f.read()
        if "'stage2_n'" in text or "'encoder_n'" in text or 'stage2_n{' in text:
          owners.append(name)
  assert owners == ['methods.py'], owners
