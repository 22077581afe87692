"""The DiT: the U-Net's call and conditioning, zero-initialised output and w branch,
remat, dropout, bfloat16; the models registry; the checkpoint meta of each arch; FSDP
over its parameters; a teacher and a stage-1 step built as the driver builds them."""

import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from gd_testlib import perturb_params, random_like
from gdistill import config_base, config_validation, model_store, networks, phases, run_plan
from gdistill import sharding, teacher_file
from gdistill.models import dit, registry
from gdistill.networks import init_params, param_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 10  # classes
SHAPE = (8, 8, 1)


def _inputs(shape, batch=3, seed=0):
  z = jax.random.normal(jax.random.PRNGKey(seed), (batch, *shape))
  logsnr = jnp.linspace(-10.0, 10.0, batch)
  label = jnp.arange(batch, dtype=jnp.int32) % (K + 1)
  return z, logsnr, label


def _abstract(net, shape=SHAPE):
  return jax.eval_shape(lambda r: init_params(net, r, shape), jax.random.PRNGKey(0))


def _init(net, shape=SHAPE):
  # An rbg key: threefry for every parameter shape compiles several times slower.
  return jax.jit(lambda r: init_params(net, r, shape))(jax.random.key(0, impl='rbg'))


@pytest.fixture(scope='module')
def tiny():
  """The tiny DiT (patch 2 on 8x8: 16 tokens) without and with w, really initialised."""
  kw = dict(size='tiny', num_classes=K, out_ch=1, patch_size=2)
  base, with_w = dit.build_dit(**kw), dit.build_dit(**kw, use_w=True)
  fresh_w = _init(with_w)
  fresh = {k: v for k, v in fresh_w.items() if not k.startswith('w_dense')}
  return dict(base=base, fresh=fresh, fresh_w=fresh_w, kw=kw,
              params=perturb_params(fresh, seed=1),  # zero-initialised layers made live
              apply=jax.jit(lambda p, z, l, c: base.apply({'params': p}, z, l, c)))


# ---- the network ------------------------------------------------------------------------

@pytest.mark.parametrize('shape,patch', [((28, 28, 1), 4), ((28, 28, 1), 2), ((32, 32, 3), 4),
                                         ((16, 8, 2), 2)])
def test_output_shape(shape, patch):
  net = dit.build_dit(size='tiny', num_classes=K, out_ch=shape[-1], patch_size=patch)
  out = jax.eval_shape(lambda p: net.apply({'params': p}, *_inputs(shape)), _abstract(net, shape))
  assert out.shape == (3, *shape) and out.dtype == jnp.float32


def test_fresh_network_predicts_zero_and_blocks_start_as_identity(tiny):
  """adaLN-zero: every block's modulation and the final linear layer start at zero."""
  out = tiny['apply'](tiny['fresh'], *_inputs(SHAPE, batch=4))
  assert out.shape == (4, *SHAPE) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)
  flat = traverse_util.flatten_dict(tiny['fresh'])
  for name in ('block_0/adaln/kernel', 'block_1/adaln/kernel', 'final_adaln/kernel',
               'final_linear/kernel'):
    np.testing.assert_array_equal(flat[tuple(name.split('/'))], 0.0)
  assert 'pos_embed' not in str(flat.keys())  # fixed sin-cos: not a parameter


def test_class_table_has_null_row_and_labels_matter(tiny):
  assert tiny['fresh']['class_embed']['embedding'].shape == (K + 1, 32)
  z, logsnr, _ = _inputs(SHAPE, batch=3)
  z, logsnr = jnp.repeat(z[:1], 3, 0), jnp.repeat(logsnr[:1], 3, 0)
  out = tiny['apply'](tiny['params'], z, logsnr, jnp.array([0, 1, K]))
  assert not np.allclose(out[0], out[1], atol=1e-4)
  assert not np.allclose(out[0], out[2], atol=1e-4)


def test_position_embedding_is_the_2d_sincos_table():
  pe = dit.sincos_pos_embed_2d(8, 2, 3)  # [h * w, D]
  assert pe.shape == (6, 8)
  # Token (row 1, col 2): the row's features first, then the column's, each [sin, cos].
  omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
  want = np.concatenate([np.sin(1 * omega), np.cos(1 * omega), np.sin(2 * omega),
                         np.cos(2 * omega)])
  np.testing.assert_allclose(pe[1 * 3 + 2], want, rtol=1e-6)


@pytest.mark.parametrize('w_relative', [False, True])
def test_student_from_teacher_is_the_conditional_teacher(tiny, w_relative):
  """A stage-1 student built from a (trained) teacher equals the conditional teacher at
  every w: the w branch's last layer is zero-initialised."""
  student = dit.build_dit(**tiny['kw'], use_w=True, w_relative=w_relative)
  flat = traverse_util.flatten_dict(tiny['fresh_w'])
  np.testing.assert_array_equal(flat[('w_dense1', 'kernel')], 0.0)
  assert np.abs(flat[('w_dense0', 'kernel')]).max() > 0  # only the last layer is zero
  p_w = networks.student_from_teacher(tiny['fresh_w'], tiny['params'])
  z, logsnr, label = _inputs(SHAPE, batch=4)
  want = tiny['apply'](tiny['params'], z, logsnr, label)
  assert np.abs(want).max() > 1e-2
  # Inputs as arguments (as in tiny['apply']): constants would be folded at compile time,
  # with other rounding.
  run = jax.jit(lambda p, z, logsnr, label, w: student.apply({'params': p}, z, logsnr, label, w))
  apply = lambda p, w: run(p, z, logsnr, label, w)
  for w in (0.0, 1.5, 4.0):
    np.testing.assert_allclose(apply(p_w, jnp.full((4,), w)), want, rtol=1e-6, atol=1e-6)
  # Once the w branch is trained, w changes the output (and at w = 0 only if absolute).
  p_w2 = networks.student_from_teacher(perturb_params(tiny['fresh_w'], seed=3), tiny['params'])
  assert not np.allclose(apply(p_w2, jnp.full((4,), 2.0)), want, atol=1e-4)
  at0 = apply(p_w2, jnp.zeros((4,)))
  if w_relative:
    np.testing.assert_allclose(at0, want, rtol=1e-5, atol=1e-5)
  else:
    assert not np.allclose(at0, want, atol=1e-4)


def test_w_argument_must_match_use_w():
  z, logsnr, label = _inputs(SHAPE)
  with_w = dit.build_dit(size='tiny', num_classes=K, out_ch=1, use_w=True)
  base = dit.build_dit(size='tiny', num_classes=K, out_ch=1)
  with pytest.raises(ValueError, match='use_w=True: pass the guidance weight'):
    jax.eval_shape(lambda r: with_w.init(r, z, logsnr, label), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='use_w=False but a guidance weight'):
    jax.eval_shape(lambda r: base.init(r, z, logsnr, label, w=jnp.ones((3,))),
                   jax.random.PRNGKey(0))


def test_bad_sizes_raise_one_line_errors():
  with pytest.raises(ValueError, match=r"model.size='huge': expected one of"):
    dit.build_dit(size='huge', num_classes=K, out_ch=1)
  net = dit.build_dit(size='tiny', num_classes=K, out_ch=1, patch_size=3)
  with pytest.raises(ValueError, match=r'model.patch_size=3: expected a divisor of .* 8x8'):
    _abstract(net)
  net = dit.build_dit(size='tiny', num_classes=K, out_ch=1, num_heads=3)
  with pytest.raises(ValueError, match=r'model.hidden_size=32: expected a multiple of '
                                       r'model.num_heads=3'):
    _abstract(net)


def test_dropout_only_when_training():
  net = dit.build_dit(size='tiny', num_classes=K, out_ch=1, patch_size=2, dropout=0.5)
  params = random_like(_abstract(net), seed=4)
  z, logsnr, label = _inputs(SHAPE, batch=2)
  run = jax.jit(lambda train, rng: net.apply({'params': params}, z, logsnr, label, train=train,
                                             rngs={'dropout': rng}), static_argnums=0)
  key = jax.random.PRNGKey
  eval_out = run(False, key(0))
  np.testing.assert_array_equal(run(False, key(1)), eval_out)  # no rng used
  a, b = run(True, key(0)), run(True, key(1))
  assert not np.allclose(a, eval_out, atol=1e-4) and not np.allclose(a, b, atol=1e-4)
  np.testing.assert_array_equal(run(True, key(0)), a)  # the 'dropout' stream decides
  off = dit.build_dit(size='tiny', num_classes=K, out_ch=1, patch_size=2, dropout=0.0)
  off_out = jax.jit(lambda rng: off.apply({'params': params}, z, logsnr, label, train=True,
                                          rngs={'dropout': rng}))(key(0))
  np.testing.assert_allclose(off_out, eval_out, rtol=1e-5, atol=1e-5)  # another program


def test_bfloat16_compute_keeps_float32_params_and_output(tiny):
  net = dit.build_dit(**tiny['kw'], dtype=jnp.bfloat16)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(_abstract(net)))
  z, logsnr, label = _inputs(SHAPE, batch=4)
  out = jax.jit(lambda p: net.apply({'params': p}, z, logsnr, label))(tiny['params'])
  want = tiny['apply'](tiny['params'], z, logsnr, label)
  assert out.dtype == jnp.float32 and np.isfinite(out).all()
  scale = float(np.abs(want).max())
  assert float(np.abs(out - want).max()) < 0.05 * scale  # bfloat16's ~3 digits, compounded


@pytest.mark.slow  # ~10-20 s: two gradient compilations
def test_remat_keeps_parameters_outputs_and_gradients():
  """``remat=True`` (nn.remat per block): the same parameter names, output and
  gradients, with dropout drawn under remat."""
  kw = dict(size='tiny', num_classes=K, out_ch=1, patch_size=2, use_w=True, dropout=0.3)
  plain, remat = dit.build_dit(**kw), dit.build_dit(**kw, remat=True)
  params = perturb_params(_init(plain), seed=2)
  assert jax.tree.structure(_abstract(remat)) == jax.tree.structure(params)
  z, logsnr, label = _inputs(SHAPE, batch=4)
  w = jnp.linspace(0.0, 4.0, 4)

  def loss(net, p, rng):
    out = net.apply({'params': p}, z, logsnr, label, w, train=True, rngs={'dropout': rng})
    return jnp.mean(jnp.square(out - z)), out

  results = {name: jax.jit(jax.grad(functools.partial(loss, net), has_aux=True))(
      params, jax.random.PRNGKey(7)) for name, net in (('plain', plain), ('remat', remat))}
  (g_plain, out_plain), (g_remat, out_remat) = results['plain'], results['remat']
  assert np.abs(out_plain).max() > 1e-2
  np.testing.assert_allclose(out_remat, out_plain, rtol=1e-6, atol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               g_remat, g_plain)


# Pinned: a change here changes every DiT checkpoint of that size (28x28x1, 10 classes;
# b2 / xl2 at 64x64x3, 1000 classes: the paper's 130M and 675M).
PARAM_COUNTS = {
    ('tiny', False): 50_640, ('tiny', True): 59_920,
    ('fmnist', False): 1_865_988, ('fmnist', True): 1_915_396,
    ('b2', False): 130_297_356, ('xl2', False): 674_807_052,
}


@pytest.mark.parametrize('size,use_w', sorted(PARAM_COUNTS))
def test_parameter_counts(size, use_w):
  shape, classes = ((64, 64, 3), 1000) if size in ('b2', 'xl2') else ((28, 28, 1), K)
  net = dit.build_dit(size=size, num_classes=classes, out_ch=shape[-1], use_w=use_w)
  assert param_count(_abstract(net, shape)) == PARAM_COUNTS[(size, use_w)]


# ---- registry, config and checkpoint meta --------------------------------------------------

def _config(model=None):
  c = config_base.base_config()
  if model is not None:
    c.model = model
  return c


def _dit_config():
  """The base config with a tiny DiT (patch 2, width 32, 2 blocks of 2 heads)."""
  return _config(config_base.dit_model(size='tiny', patch_size=2, hidden_size=32, depth=2,
                                       num_heads=2))


def test_registry_names_each_arch():
  assert registry.get('unet').build is not registry.get('dit').build
  assert registry.arch_name({'size': 'fmnist'}) == 'unet'  # every config before DiTs
  with pytest.raises(ValueError, match=r"model.arch='vit': expected one of \('dit', 'unet'\)"):
    registry.get('vit')
  config = _dit_config()
  config.model.arch = 'vit'
  with pytest.raises(ValueError, match=r"model.arch='vit'"):
    networks.make_net(config, num_classes=K, out_ch=1, use_w=False)
  with pytest.raises(config_validation.ConfigError,
                     match=r"^model.arch='vit': expected one of \('dit', 'unet'\)$"):
    config_validation.validate(config)


# What model_kwargs gave for configs/fashion_mnist.py before the registry (commit
# c19b2e8): the U-Net's checkpoint meta, workdirs and weights files depend on it.
UNET_META_BEFORE_REGISTRY = {
    False: {'attn_resolutions': [7], 'ch': 32, 'ch_mult': [1, 2, 2], 'dropout': 0.1,
            'num_res_blocks': 1, 'size': 'fmnist'},
    True: {'attn_resolutions': [7], 'ch': 32, 'ch_mult': [1, 2, 2], 'dropout': 0.1,
           'num_res_blocks': 1, 'size': 'fmnist', 'w_relative': True},
}


def _fashion_mnist_config():
  spec = importlib.util.spec_from_file_location('fashion_mnist',
                                                os.path.join(ROOT, 'configs', 'fashion_mnist.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_unet_meta_is_what_it_was_before_the_registry():
  """No ``arch`` entry for a U-Net, with the key absent or explicit; the shipped
  teacher's sidecar still matches the network the config expects."""
  config = _fashion_mnist_config()
  assert 'arch' not in config.model
  for use_w, want in UNET_META_BEFORE_REGISTRY.items():
    assert networks.model_kwargs(config, use_w=use_w) == want
  assert type(networks.make_net(config, num_classes=K, out_ch=1, use_w=False)).__name__ == 'UNet'
  info = teacher_file.read_info(os.path.join(ROOT, 'gdistill', 'weights',
                                             'fashion_mnist_teacher.msgpack'))
  want = teacher_file.expected(config, use_w=False, num_classes=K, image_shape=(28, 28, 1))
  assert {k: info[k] for k in teacher_file.NETWORK_KEYS} == want
  with config.unlocked():
    config.model.arch = 'unet'
  for use_w, want in UNET_META_BEFORE_REGISTRY.items():
    assert networks.model_kwargs(config, use_w=use_w) == want
  config_validation.validate(config, image_shape=(28, 28, 1))


def test_dit_meta_names_its_arch_and_round_trips(tmp_path):
  """A DiT's meta carries arch='dit' and its keys; a weights file written with it loads
  back for the same config and is refused by a U-Net config."""
  config = _dit_config()
  kw = networks.model_kwargs(config, use_w=False)
  assert kw == {'arch': 'dit', 'size': 'tiny', 'patch_size': 2, 'hidden_size': 32, 'depth': 2,
                'num_heads': 2, 'mlp_ratio': 4.0, 'dropout': 0.0}
  assert json.loads(json.dumps(kw)) == kw
  net = networks.make_net(config, num_classes=K, out_ch=1, use_w=False)
  assert isinstance(net, dit.DiT) and net.patch_size == 2 and net.hidden_size == 32
  params = _init(net)
  path = str(tmp_path / 'dit_teacher.msgpack')
  info = teacher_file.network_info(config, use_w=False, num_classes=K, image_shape=SHAPE)
  teacher_file.save_params(path, params, info)
  expect = teacher_file.expected(config, use_w=False, num_classes=K, image_shape=SHAPE)
  loaded, _ = teacher_file.load_params(path, expect=expect, abstract_params=_abstract(net))
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  unet_expect = teacher_file.expected(_config(), use_w=False, num_classes=K, image_shape=SHAPE)
  with pytest.raises(Exception, match='model'):
    teacher_file.load_params(path, expect=unet_expect, abstract_params=None)


@pytest.mark.parametrize('change,message', [
    (dict(patch_size=3), r"model.patch_size=3: expected a divisor of the image size 28x28"),
    (dict(num_heads=3), r'model.hidden_size=32: expected a multiple of model.num_heads=3'),
    (dict(size='xl'), r"model.size='xl': expected one of \['b2', 'fmnist', 'tiny', 'xl2'\]"),
    (dict(depth=0), r'model.depth=0: expected a positive integer'),
])
def test_dit_config_errors_name_key_value_and_expectation(change, message):
  config = _dit_config()
  config_validation.validate(config, image_shape=(28, 28, 1))
  config.model.update(change)
  with pytest.raises(config_validation.ConfigError, match=f'^{message}'):
    config_validation.validate(config, image_shape=(28, 28, 1))


def test_keys_of_the_other_arch_are_refused():
  config = _dit_config()
  with config.unlocked():
    config.model.ch_mult = (1, 2)
  with pytest.raises(config_validation.ConfigError,
                     match=r"model.ch_mult=\(1, 2\): expected no such key for "
                           r"model.arch='dit' \(its keys: size, patch_size"):
    config_validation.validate(config)
  config = _config()
  with config.unlocked():
    config.model.patch_size = 2
  with pytest.raises(config_validation.ConfigError, match=r"model.patch_size=2: .*'unet'"):
    config_validation.validate(config)


# ---- sharding and steps ----------------------------------------------------------------------

def test_fsdp_splits_the_dit_parameters(devices8):
  """The generic FSDP rule (largest dimension the axis divides) splits DiT-B/2's
  matrices: everything but biases, and the few small arrays, lies across 8 devices."""
  net = dit.build_dit(size='b2', num_classes=1000, out_ch=3, use_w=True)
  abstract = _abstract(net, (64, 64, 3))
  mesh = sharding.make_mesh({'data': -1}, devices8)
  shard = sharding.state_shardings(abstract, mesh, 'fsdp')
  specs = {'/'.join(k): v.spec for k, v in traverse_util.flatten_dict(shard).items()}
  assert specs['block_0/attn/qkv/kernel'] == P(None, 'data')       # (768, 2304)
  assert specs['block_0/mlp_in/kernel'] == P(None, 'data')         # (768, 3072)
  assert specs['block_0/mlp_out/kernel'] == P('data', None)        # (3072, 768)
  assert specs['block_0/adaln/kernel'] == P(None, 'data')          # (768, 4608)
  assert specs['patch_embed/kernel'] == P(None, None, None, 'data')  # (2, 2, 3, 768)
  assert specs['class_embed/embedding'] == P(None, 'data')         # (1001, 768): 8 !| 1001
  assert specs['final_linear/kernel'] == P('data', None)           # (768, 12): 8 !| 12
  split = sum(a.size for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shard))
              if s.spec != P())
  assert split > 0.99 * param_count(abstract)


@pytest.mark.slow  # ~15-25 s on the 2-core CPU: two step compilations
def test_dit_teacher_and_stage1_steps_run(devices8):
  """The driver's own phase builder with a tiny DiT config: a teacher step, then a
  stage-1 step from its parameters; both move the parameters and say arch='dit'."""
  config = _dit_config()
  config.teacher.update(batch_size=8, warmup_steps=0)
  config.stage1.update(batch_size=8, warmup_steps=0)
  mesh = sharding.make_mesh({'data': -1}, devices8[:1])
  store = model_store.ModelStore('unused', config, mesh=mesh, image_shape=SHAPE, num_classes=K)
  builder = phases.PhaseBuilder(config, store)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.uniform(-1, 1, (8, *SHAPE)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, K, 8), jnp.int32)}

  def one_step(phase):
    # The checkpoint meta says what the network is, as the store expects it on loading.
    assert phase.meta['model']['arch'] == 'dit'
    want = store.expected_meta(use_w=phase.meta['use_w'])
    assert json.loads(json.dumps({k: phase.meta[k] for k in want})) == want
    state = jax.jit(phase.init_fn)(phase.frozen)
    new, metrics = jax.jit(phase.update_fn)(state, phase.frozen, batch, jax.random.PRNGKey(1))
    assert np.isfinite(float(metrics['loss'])) and float(metrics['loss']) > 0
    # adaLN-zero: at init only the zero-initialised output layer has a gradient (every
    # other path runs through it or through a zero gate), so that layer moves first.
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.params, state.params)
    assert moved['final_linear']['kernel'] > 1e-5, moved
    return state, new

  teacher = builder.build(run_plan.PhaseSpec('teacher', run_plan.TEACHER, None, None, 'teacher'))
  _, trained = one_step(teacher)
  stage1 = builder.build(run_plan.PhaseSpec('stage1', run_plan.STAGE1, None, 'teacher', 'stage1'),
                         trained.params)
  start, _ = one_step(stage1)
  assert 'w_dense1' in start.params  # the student has the w branch the teacher lacks
  np.testing.assert_array_equal(start.params['final_linear']['kernel'],
                                trained.params['final_linear']['kernel'])  # from its teacher
