"""The full-scale configs are complete: they validate, build at full size
(abstractly), shard, and run every training stage for a step at tiny size."""

import copy
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

import registry_golden

from gdistill import config_validation, networks, run_setup, sharding, train, workdir
from gdistill.data import ImageSource
from gdistill.models import dit
from gdistill.networks import init_params, param_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ('fashion_mnist', 'fashion_mnist_teacher', 'smoke', 'cifar10', 'imagenet64',
           'imagenet64_dit', 'fashion_mnist_latent', 'fashion_mnist_latent_teacher')
# The networks' input: a latent config's is its autoencoder's latents.
SHAPES = {'fashion_mnist': ((28, 28, 1), 10), 'fashion_mnist_teacher': ((28, 28, 1), 10),
          'smoke': ((28, 28, 1), 10), 'fashion_mnist_latent': ((7, 7, 4), 10),
          'fashion_mnist_latent_teacher': ((7, 7, 4), 10),
          'cifar10': ((32, 32, 3), 10), 'imagenet64': ((64, 64, 3), 1000),
          'imagenet64_dit': ((64, 64, 3), 1000)}
# Full-size teacher parameter counts (pinned: a change here changes every result).
# CIFAR-10: 60.0M with the authors' resblock resampling; ImageNet 64: 295.9M; the DiT-B/2.
FULL_PARAMS = {'fashion_mnist': (1.0e6, 1.5e6), 'cifar10': (35e6, 65e6),
               'imagenet64': (150e6, 400e6), 'imagenet64_dit': (125e6, 135e6)}


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# The Inception weights a user passes on the command line (see the configs' docstrings).
INCEPTION = {'cifar10': '/weights/pt_inception-2015-12-05.pth',
             'imagenet64': '/weights/pt_inception-2015-12-05.pth',
             'imagenet64_dit': '/weights/pt_inception-2015-12-05.pth'}


@pytest.mark.parametrize('name', CONFIGS)
def test_config_validates_for_its_dataset(name):
  config = load_config(name)
  shape, _ = SHAPES[name]
  if name in INCEPTION:
    config.eval.inception_weights = INCEPTION[name]
  config_validation.validate(config, image_shape=shape, num_devices=8)
  assert config.data.name and isinstance(config.seed, int) and config.stages


@pytest.mark.parametrize('name', sorted(INCEPTION))
def test_eval_without_inception_weights_fails_before_training(name):
  config = load_config(name)
  assert 'eval' in config.stages
  with pytest.raises(config_validation.ConfigError,
                     match=r"eval\.inception_weights='': .*leave 'eval' out of --config\.stages"):
    config_validation.validate(config, image_shape=SHAPES[name][0], num_devices=8)
  config.stages = tuple(s for s in config.stages if s != 'eval')
  config_validation.validate(config, image_shape=SHAPES[name][0], num_devices=8)


def test_bad_eval_key_fails_in_validate():
  config = load_config('fashion_mnist')
  config.eval.num_samples = 0
  with pytest.raises(config_validation.ConfigError, match=r'eval\.num_samples=0'):
    config_validation.validate(config)
  config.stages = ('teacher',)
  config_validation.validate(config)  # not evaluated: not checked


@pytest.mark.parametrize('value', [((3, 100),), ((2, 0),), ((2, 100), (2, 50)), ((2,),),
                                   ((2, 1.5),)])
def test_stage2_num_steps_for_names_its_halvings(value):
  config = load_config('fashion_mnist')
  config.stage2.num_steps_for = ((2, 100), (1, 100))
  config_validation.validate(config)
  config.stage2.num_steps_for = value
  with pytest.raises(config_validation.ConfigError,
                     match=r'stage2\.num_steps_for=.*student steps among the halvings \['):
    config_validation.validate(config)


@pytest.mark.parametrize('section', ['stage1', 'stage2'])
def test_w_balance_must_be_a_bool(section):
  config = load_config('fashion_mnist')
  with config.unlocked():
    del config[section]['w_balance']
    config[section].w_balance = 1  # a config file may set anything
  with pytest.raises(config_validation.ConfigError,
                     match=rf'{section}\.w_balance=1: expected True or False'):
    config_validation.validate(config)


@pytest.mark.parametrize('section', ['teacher', 'stage1', 'stage2'])
def test_a_phase_weighting_overrides_the_diffusion_one_and_is_validated(section):
  from gdistill import phases  # pylint: disable=g-import-not-at-top
  config = load_config('fashion_mnist')
  assert phases.weighting(config, config[section]) == config.diffusion.weighting
  config[section].weighting = 'snr'  # the authors' teacher and stage-1 weighting (eps-MSE)
  config_validation.validate(config)
  assert phases.weighting(config, config[section]) == 'snr'
  config[section].weighting = 'p2'
  with pytest.raises(config_validation.ConfigError,
                     match=rf"{section}\.weighting='p2': expected '' \(diffusion.weighting\) or "
                           r"one of \('snr_trunc', 'snr_plus_one', 'snr', 'constant'\)"):
    config_validation.validate(config)


@pytest.mark.parametrize('section', ['stage1', 'stage2'])
@pytest.mark.parametrize('value', [1.0, -0.1, 'half', True])
def test_w_min_frac_must_be_a_fraction_below_one(value, section):
  config = load_config('fashion_mnist')
  with config.unlocked():
    del config[section]['w_min_frac']
    config[section].w_min_frac = value  # a config file may set anything
  with pytest.raises(config_validation.ConfigError,
                     match=rf'{section}\.w_min_frac={value!r}: expected a number in \[0, 1\)'):
    config_validation.validate(config)


def test_cpu_xla_tuned_must_be_a_bool():
  config = load_config('fashion_mnist')
  assert config.cpu_xla_tuned is True
  with config.unlocked():
    del config['cpu_xla_tuned']
    config.cpu_xla_tuned = 'yes'  # a config file may set anything
  with pytest.raises(config_validation.ConfigError, match=r"cpu_xla_tuned='yes': expected True"):
    config_validation.validate(config)


def test_data_num_workers_is_a_count_or_auto():
  config = load_config('fashion_mnist')
  assert config.data.num_workers == -1  # from the usable cores
  for workers in (0, 4):
    config.data.num_workers = workers
    config_validation.validate(config)
  config.data.num_workers = -2
  with pytest.raises(config_validation.ConfigError, match=r'data\.num_workers=-2'):
    config_validation.validate(config)


def test_remat_on_for_imagenet64_and_not_part_of_the_network(tmp_path):
  """model.remat: on where the full-scale config needs the memory, off on the CPU
  configs; a bool; left out of the checkpoint meta and changeable on a workdir,
  so checkpoints and workdirs of either value (or of before the key) load."""
  for name in CONFIGS:
    assert load_config(name).model.remat is name.startswith('imagenet64'), name
  config = load_config('imagenet64')
  assert 'remat' not in networks.model_kwargs(config)
  assert networks.make_net(config, num_classes=1000, out_ch=3, use_w=False).remat
  workdir.record_config(config, str(tmp_path))
  config.model.remat = False
  workdir.check_config(config, str(tmp_path))
  old = json.loads((tmp_path / workdir.CONFIG_FILE).read_text())
  del old['model']['remat']  # a workdir of before the key
  (tmp_path / workdir.CONFIG_FILE).write_text(json.dumps(old))
  workdir.check_config(config, str(tmp_path))
  with config.unlocked():
    del config.model['remat']
    config.model.remat = 'block'  # a config file may set anything
  with pytest.raises(config_validation.ConfigError, match=r"model.remat='block': expected True"):
    config_validation.validate(config)


@pytest.mark.parametrize('name', ['fashion_mnist', 'cifar10', 'imagenet64', 'imagenet64_dit'])
def test_full_size_model_builds_and_shards(name, devices8):
  config = load_config(name)
  shape, classes = SHAPES[name]
  net = networks.make_net(config, num_classes=classes, out_ch=shape[-1], use_w=False)
  abstract = jax.eval_shape(lambda r: init_params(net, r, shape), jax.random.PRNGKey(0))
  lo, hi = FULL_PARAMS[name]
  assert lo < param_count(abstract) < hi, param_count(abstract)
  mesh = sharding.make_mesh({'data': -1}, devices8)
  shardings = sharding.state_shardings(abstract, mesh, config.sharding)
  if config.sharding == 'fsdp':
    split = sum(a.size for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))
                if s.spec != jax.sharding.PartitionSpec())
    assert split > 0.95 * param_count(abstract)  # all but norms and biases


def test_imagenet64_dit_is_dit_b2_with_the_imagenet64_recipe():
  """The DiT config is configs/imagenet64.py with the network swapped (and DiT's learning
  rate and dropout): the same data, batch, stages, precision, sharding and evaluation."""
  d, u = load_config('imagenet64_dit'), load_config('imagenet64')
  assert d.model.arch == 'dit' and d.model.size == 'b2'
  assert {k: d.model[k] for k in dit.SIZES['b2']} == dit.SIZES['b2']
  assert networks.model_kwargs(d)['arch'] == 'dit'
  dd, ud = d.to_dict(), u.to_dict()
  assert sorted(dd) == sorted(ud)
  for key in dd:
    if key not in ('model', 'teacher'):
      assert dd[key] == ud[key], key
  assert {k: v for k, v in dd['teacher'].items() if k != 'learning_rate'} == \
      {k: v for k, v in ud['teacher'].items() if k != 'learning_rate'}
  assert d.teacher.learning_rate == 1e-4


def random_images(name, shape, classes, n=64):
  """A stand-in source of the dataset's shape (the real one needs internet): ``n``
  random examples read through the same Grain path as any TFDS data source."""
  rng = np.random.default_rng(0)
  examples = [{'image': rng.integers(0, 256, shape, dtype=np.uint8),
               'label': int(rng.integers(classes))} for _ in range(n)]
  return ImageSource(name=name, split='train', num_examples=n, image_shape=shape,
                     num_classes=classes, class_names=[str(i) for i in range(classes)],
                     data_source=examples, in_memory=True)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['cifar10', 'imagenet64', 'imagenet64_dit'])
def test_every_stage_runs_a_step_at_tiny_size(name, devices8, tmp_path, monkeypatch):
  """The full config's structure (levels, blocks, attention, precision, sharding)
  with 8 channels (a DiT: width 32, 2 blocks): teacher, stage 1, one halving and the
  stochastic sampler's own student (the authors' two_nvidia_distillation, its section's
  settings) each run a step on 8 devices."""
  config = load_config(name)
  shape, classes = SHAPES[name]
  with config.unlocked():
    config.stages = ('teacher', 'stage1', 'stage2')
    if config.model.get('arch') == 'dit':  # the patch size kept; 2 blocks of width 32
      config.model.update(hidden_size=32, depth=2, num_heads=4)
    else:
      config.model.ch = 8
      if config.model.get('attn_head_dim', 0):  # the authors' 64-channel heads, scaled down
        config.model.attn_head_dim = 8
    for phase in ('teacher', 'stage1', 'stage2'):
      config[phase].update(num_steps=1, batch_size=8, warmup_steps=0, checkpoint_every=1)
    config.stage2.update(start_steps=2, min_steps=1, time_grid='deterministic')
    config.stage2.stochastic.update(sampler_steps=(2,), num_steps=1, batch_size=8,
                                    checkpoint_every=1)
    config.samples.update(per_class=1, max_classes=8, teacher_steps=1, student_w=(1.0,))
  source = random_images(name, shape, classes)
  monkeypatch.setattr(run_setup, 'open_source', lambda *a, **k: source)
  train.train_and_evaluate(config, str(tmp_path))
  for phase in ('teacher', 'stage1', 'stage2_n0001', 'stage2s_n0001'):
    assert os.listdir(tmp_path / 'checkpoints' / phase)


def test_teacher_config_trains_the_embedded_default_network():
  """configs/fashion_mnist_teacher.py trains (and tracks) the network the embedded default
  distils, with a schedule that allows training it longer."""
  teacher, default = load_config('fashion_mnist_teacher'), load_config('fashion_mnist')
  assert teacher.model.to_dict() == default.model.to_dict()
  assert teacher.data.to_dict() == default.data.to_dict()
  assert teacher.stages == ('teacher',) and not teacher.teacher_checkpoint
  assert teacher.teacher.lr_decay == 'constant' and teacher.track.enabled


@pytest.mark.parametrize('name', ['fashion_mnist_latent', 'fashion_mnist_latent_teacher'])
def test_latent_configs_name_the_shipped_autoencoder_and_fit_its_latents(name):
  from gdistill import run_setup  # pylint: disable=g-import-not-at-top
  config = load_config(name)
  codec = run_setup.open_codec(config, (28, 28, 1))
  assert not codec.is_identity and codec.model_shape() == SHAPES[name][0]
  pixel = load_config('fashion_mnist')
  # The pixel default's pipeline, so the two reports compare, less what the pixel default
  # changed after the latent measurement (the registry golden's list of those changes).
  before = registry_golden.put_back(copy.deepcopy(pixel), 'fashion_mnist')
  for key in ('stages', 'stage1', 'stage2', 'translate'):
    if name == 'fashion_mnist_latent':
      assert config[key] == before[key], key
  assert config.eval.num_samples == pixel.eval.num_samples
