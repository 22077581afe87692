"""The authors' network options (issue 27): the w embedding and its warm-up scale, multi-head
attention and residual-block resampling. Off by default: today's networks, parameters,
outputs, checkpoint meta and workdir records are unchanged; each option changes what it
should and nothing else. Tiny sizes; shapes by ``jax.eval_shape``."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gd_testlib import random_like
from gdistill import config_base, config_validation, networks, workdir
from gdistill.models import dit, unet
from gdistill.networks import init_params

K = 10
SHAPE = (8, 8, 1)
# The tiny U-Net with attention at every level (8x8 and 4x4: 16 and 32 channels).
UNET_KW = dict(size='tiny', num_classes=K, out_ch=1, attn_resolutions=(8, 4))
DIT_KW = dict(size='tiny', num_classes=K, out_ch=1, patch_size=2)
NEW_UNET_DEFAULTS = dict(w_embedding='fourier', attn_head_dim=0, resblock_resample=False)


def _inputs(shape=SHAPE, batch=3):
  z = jax.random.normal(jax.random.PRNGKey(0), (batch, *shape))
  return z, jnp.linspace(-10.0, 10.0, batch), jnp.arange(batch, dtype=jnp.int32) % (K + 1)


def _abstract(net, shape=SHAPE):
  return jax.eval_shape(lambda r: init_params(net, r, shape), jax.random.PRNGKey(0))


def _shapes(tree):
  return {'/'.join(k): v.shape for k, v in traverse_util.flatten_dict(tree).items()}


def _apply(net, params, w=None, shape=SHAPE, **kw):
  z, logsnr, label = _inputs(shape)
  return jax.jit(lambda p, w: net.apply({'params': p}, z, logsnr, label, w, **kw))(params, w)


def _build(arch, **kw):
  return (unet.build_unet(**UNET_KW, **kw) if arch == 'unet' else dit.build_dit(**DIT_KW, **kw))


# ---- defaults: today's networks -----------------------------------------------------------

@pytest.mark.parametrize('use_w', [False, True])
def test_defaults_build_todays_unet(use_w):
  """No new key, or every new key at its default: the same module, parameters and output."""
  today = unet.build_unet(**UNET_KW, use_w=use_w)
  explicit = unet.UNet(num_classes=K, out_ch=1, use_w=use_w,
                       **dict(unet.SIZES['tiny'], attn_resolutions=(8, 4)), **NEW_UNET_DEFAULTS)
  assert explicit == today
  abstract = _abstract(today)
  assert _shapes(_abstract(explicit)) == _shapes(abstract)
  params = random_like(abstract, seed=1)
  w = jnp.linspace(0.0, 4.0, 3) if use_w else None
  np.testing.assert_array_equal(_apply(explicit, params, w), _apply(today, params, w))


@pytest.mark.parametrize('use_w', [False, True])
def test_defaults_build_todays_dit(use_w):
  today = dit.build_dit(**DIT_KW, use_w=use_w)
  assert dit.build_dit(**DIT_KW, use_w=use_w, w_embedding='fourier') == today
  assert dit.DiT(num_classes=K, out_ch=1, use_w=use_w, **dict(dit.SIZES['tiny'], patch_size=2),
                 w_embedding='fourier') == today


def _config_without_new_keys():
  config = config_base.base_config()
  model = {k: v for k, v in config.model.to_dict().items()
           if k not in ('w_embedding', 'w_warmup_steps', 'attn_head_dim', 'resblock_resample')}
  config.model = type(config.model)(model)
  return config


@pytest.mark.parametrize('use_w', [False, True])
def test_config_defaults_give_the_meta_and_network_of_a_config_without_the_keys(use_w):
  """base_config's new keys at their defaults: the checkpoint meta (model_kwargs) and the
  network are those of a config written before the keys existed."""
  new, old = config_base.base_config(), _config_without_new_keys()
  assert 'w_embedding' in new.model and 'w_embedding' not in old.model
  assert networks.model_kwargs(new, use_w=use_w) == networks.model_kwargs(old, use_w=use_w)
  assert not set(networks.model_kwargs(new, use_w=use_w)) & {
      'w_embedding', 'w_warmup_steps', 'attn_head_dim', 'resblock_resample'}
  build = lambda c: networks.make_net(c, num_classes=K, out_ch=1, use_w=use_w)
  assert build(new) == build(old)
  config_validation.validate(new, image_shape=(28, 28, 1))
  config_validation.validate(old, image_shape=(28, 28, 1))


def test_dit_model_section_defaults():
  section = config_base.dit_model(size='tiny', patch_size=2, hidden_size=32, depth=2, num_heads=2)
  assert section.w_embedding == 'fourier' and section.w_warmup_steps == 0


def test_set_options_reach_the_meta_and_the_network():
  config = config_base.base_config()
  config.model.update(w_embedding='authors', w_warmup_steps=100, attn_head_dim=16,
                      resblock_resample=True)
  student = networks.model_kwargs(config, use_w=True)
  teacher = networks.model_kwargs(config, use_w=False)
  assert student['w_embedding'] == 'authors' and 'w_embedding' not in teacher  # w branch only
  for kw in (student, teacher):
    assert kw['attn_head_dim'] == 16 and kw['resblock_resample'] is True
    assert 'w_warmup_steps' not in kw  # the loss's, not the network's
  net = networks.make_net(config, num_classes=K, out_ch=1, use_w=True)
  assert (net.w_embedding, net.attn_head_dim, net.resblock_resample) == ('authors', 16, True)
  assert networks.make_net(config, num_classes=K, out_ch=1, use_w=False).attn_head_dim == 16


def test_workdir_records_without_the_keys_still_resume(tmp_path):
  """A config.json written before the keys: today's defaults match it, other values not."""
  old = _config_without_new_keys()
  (tmp_path / workdir.CONFIG_FILE).write_text(json.dumps(old.to_dict(), default=str))
  workdir.check_config(config_base.base_config(), str(tmp_path))
  for key, value in (('w_embedding', 'authors'), ('w_warmup_steps', 10), ('attn_head_dim', 16),
                     ('resblock_resample', True)):
    config = config_base.base_config()
    config.model[key] = value
    with pytest.raises(workdir.WorkdirError, match=f'model.{key}'):
      workdir.check_config(config, str(tmp_path))


# ---- the w embedding and its warm-up --------------------------------------------------------

class _Branch(nn.Module):
  """add_guidance_weight on a zero embedding: the w branch's output alone."""
  embedding: str
  dim: int = 12
  features: int = 8

  @nn.compact
  def __call__(self, w, w_scale=None):
    return unet.add_guidance_weight(jnp.zeros((w.shape[0], self.dim)), w, use_w=True, net='test',
                                    features=self.features, scale=250.0, relative=False,
                                    embedding=self.embedding, w_scale=w_scale)


def test_authors_w_embedding_is_their_transform_and_init():
  """'authors': sinusoidal features of 1000 arctan(exp(-w/2)) / (pi/2), Dense, swish, Dense
  with Flax's default init (not zero); the same parameter names and shapes as 'fourier'."""
  w = jnp.array([0.0, 0.5, 1.0, 4.0])
  fourier = _Branch('fourier').init(jax.random.PRNGKey(0), w)['params']
  authors = _Branch('authors').init(jax.random.PRNGKey(0), w)['params']
  assert _shapes(authors) == _shapes(fourier)
  np.testing.assert_array_equal(fourier['w_dense1']['kernel'], 0.0)
  assert np.abs(authors['w_dense1']['kernel']).min() > 0  # lecun-normal, not zero

  got = _Branch('authors').apply({'params': authors}, w)
  t = 1000.0 * np.arctan(np.exp(-np.asarray(w) / 2)) / (np.pi / 2)
  freqs = np.exp(-math.log(10000.0) * np.arange(4) / 3)
  feats = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
  d0, d1 = authors['w_dense0'], authors['w_dense1']
  h = feats @ np.asarray(d0['kernel']) + np.asarray(d0['bias'])
  want = (h / (1 + np.exp(-h))) @ np.asarray(d1['kernel']) + np.asarray(d1['bias'])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The same weights under the Fourier features compute something else.
  assert not np.allclose(_Branch('fourier').apply({'params': authors}, w), got, atol=1e-3)
  # w_scale multiplies the output: scalar or per example.
  np.testing.assert_allclose(_Branch('authors').apply({'params': authors}, w, 0.25),
                             0.25 * got, rtol=1e-6, atol=1e-7)
  per = jnp.array([0.0, 1.0, 0.5, 1.0])
  np.testing.assert_allclose(_Branch('authors').apply({'params': authors}, w, per),
                             per[:, None] * got, rtol=1e-6, atol=1e-7)


def test_w_warmup_scale():
  assert unet.w_warmup_scale(5, 0) is None  # no warm-up: the network's w_scale=None
  got = [float(unet.w_warmup_scale(jnp.int32(s), 10_000)) for s in (0, 2_500, 10_000, 50_000)]
  assert got == [0.0, 0.25, 1.0, 1.0]


# Each architecture and each embedding in the default suite; the other two pairs slow (CI time).
@pytest.mark.parametrize('embedding,arch', [
    ('fourier', 'unet'), ('authors', 'dit'),
    pytest.param('authors', 'unet', marks=pytest.mark.slow),
    pytest.param('fourier', 'dit', marks=pytest.mark.slow)])
def test_w_scale_zero_removes_the_w_branch(arch, embedding):
  """w_scale 0: the student computes the network without a w branch (its shared weights);
  1: exactly w_scale=None; in between: neither. Per-example scales act per example."""
  student, teacher = _build(arch, use_w=True, w_embedding=embedding), _build(arch)
  params = random_like(_abstract(student), seed=2)  # every layer live, w_dense1 too
  shared = {k: v for k, v in params.items() if not k.startswith('w_dense')}
  w = jnp.array([0.5, 2.0, 4.0])
  without = _apply(teacher, shared)
  assert np.abs(without).max() > 1e-2
  run = jax.jit(lambda s: _student_out(student, params, w, s))
  np.testing.assert_allclose(run(jnp.float32(0.0)), without, rtol=1e-5, atol=1e-5)
  full = _apply(student, params, w)
  np.testing.assert_allclose(run(jnp.float32(1.0)), full, rtol=1e-5, atol=1e-5)  # another program
  half = run(jnp.float32(0.5))
  assert not np.allclose(half, without, atol=1e-4) and not np.allclose(half, full, atol=1e-4)
  per = run(jnp.array([0.0, 1.0, 0.5]))
  np.testing.assert_allclose(per[0], without[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(per[1], full[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(per[2], half[2], rtol=1e-5, atol=1e-5)


def _student_out(net, params, w, w_scale):
  z, logsnr, label = _inputs()
  return net.apply({'params': params}, z, logsnr, label, w, w_scale=w_scale)


@pytest.mark.parametrize('arch', ['unet', 'dit'])
def test_w_scale_without_a_w_branch_is_refused(arch):
  z, logsnr, label = _inputs()
  with pytest.raises(ValueError, match='use_w=False but a w-embedding scale'):
    jax.eval_shape(lambda r: _build(arch).init(r, z, logsnr, label, w_scale=0.5),
                   jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"model.w_embedding='inv_cos': expected one of"):
    jax.eval_shape(lambda r: _build(arch, use_w=True, w_embedding='inv_cos').init(
        r, z, logsnr, label, jnp.ones((3,))), jax.random.PRNGKey(0))


# ---- multi-head attention -------------------------------------------------------------------

def test_attn_head_dim_keeps_parameters_and_shape_and_changes_the_function():
  """Heads split the same qkv / proj_out; head_dim = C (one head) is single-head attention,
  smaller heads another function; the output keeps its shape."""
  base = unet.build_unet(**UNET_KW)
  abstract = _abstract(base)
  # Large q, k: attention far from uniform, where the split into heads shows.
  params = traverse_util.flatten_dict(random_like(abstract, seed=3))
  params = traverse_util.unflatten_dict(
      {k: 20.0 * v if k[-2:] == ('qkv', 'kernel') else v for k, v in params.items()})
  want = _apply(base, params)
  for head_dim in (4, 8, 16):
    net = unet.build_unet(**UNET_KW, attn_head_dim=head_dim)
    assert _shapes(_abstract(net)) == _shapes(abstract)
    out = _apply(net, params)
    assert out.shape == want.shape == (3, *SHAPE)
    assert not np.allclose(out, want, atol=1e-4), head_dim
  block = unet.AttnBlock(head_dim=16)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 16))
  p = random_like(jax.eval_shape(lambda r: block.init(r, x), jax.random.PRNGKey(0))['params'], 4)
  np.testing.assert_allclose(block.apply({'params': p}, x),
                             unet.AttnBlock().apply({'params': p}, x), rtol=1e-5, atol=1e-5)


def test_attn_head_dim_must_divide_the_channels():
  net = unet.build_unet(**UNET_KW, attn_head_dim=12)  # 16 and 32 channels
  with pytest.raises(ValueError, match=r'model.attn_head_dim=12: expected a divisor of the '
                                       r'channels \(16\) of attention block down_0_attn_0'):
    _abstract(net)


# ---- residual-block resampling --------------------------------------------------------------

@pytest.mark.parametrize('shape', [(8, 8, 1), (16, 8, 3)])
def test_resblock_resample_shapes_at_every_level(shape):
  """Each downsample halves, each upsample doubles, at the level's channels; the resample
  blocks have a residual block's parameters where the convs were."""
  ch_mult = (1, 2, 3)
  net = unet.build_unet(size='tiny', num_classes=K, out_ch=shape[-1], ch_mult=ch_mult,
                        resblock_resample=True, attn_resolutions=(4,))
  params = _abstract(net, shape)
  z, logsnr, label = _inputs(shape)
  out, state = jax.eval_shape(lambda p: net.apply({'params': p}, z, logsnr, label,
                                                  capture_intermediates=True,
                                                  mutable=['intermediates']), params)
  assert out.shape == z.shape
  inter = state['intermediates']
  h, w, ch = shape[0], shape[1], 16
  for level, mult in enumerate(ch_mult[:-1]):
    assert inter[f'down_{level}_downsample']['__call__'][0].shape == (
        3, h >> (level + 1), w >> (level + 1), ch * mult)
  for level in range(1, len(ch_mult)):
    assert inter[f'up_{level}_upsample']['__call__'][0].shape == (
        3, h >> (level - 1), w >> (level - 1), ch * ch_mult[level])
  names = _shapes(params)
  plain = _shapes(_abstract(unet.build_unet(size='tiny', num_classes=K, out_ch=shape[-1],
                                            ch_mult=ch_mult, attn_resolutions=(4,)), shape))
  for name in ('down_0_downsample', 'down_1_downsample', 'up_1_upsample', 'up_2_upsample'):
    c = names[f'{name}/conv1/kernel'][-1]
    assert names[f'{name}/conv1/kernel'] == names[f'{name}/conv2/kernel'] == (3, 3, c, c)
    assert names[f'{name}/temb_proj/kernel'] == (64, 2 * c)
    assert f'{name}/nin_shortcut/kernel' not in names and f'{name}/kernel' not in names
    assert plain[f'{name}/kernel'] == (3, 3, c, c)
  # Only the resampling layers differ.
  assert {k for k in names if 'sample' not in k} == {k for k in plain if 'sample' not in k}


def test_resample_blocks_start_as_pool_and_nearest_upsample():
  """Zero-initialised conv2: a fresh resample block is its shortcut, the pooled or
  upsampled input; avg_pool_2x is Flax's 2x2 average pool."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 4, 16))
  emb = jax.random.normal(jax.random.PRNGKey(1), (2, 32))
  np.testing.assert_allclose(unet.avg_pool_2x(x), nn.avg_pool(x, (2, 2), (2, 2)), rtol=1e-6,
                             atol=1e-6)
  for resample, want in (('down', unet.avg_pool_2x(x)), ('up', unet.upsample_nearest_2x(x))):
    block = unet.ResnetBlock(16, 0.0, resample=resample)
    params = block.init(jax.random.PRNGKey(2), x, emb, False)
    np.testing.assert_array_equal(block.apply(params, x, emb, False), want)


def test_remat_keeps_the_resample_parameters():
  kw = dict(UNET_KW, resblock_resample=True, attn_head_dim=8)
  assert _shapes(_abstract(unet.build_unet(**kw, remat=True))) == _shapes(
      _abstract(unet.build_unet(**kw)))


# ---- config validation ----------------------------------------------------------------------

def _fmnist():
  config = config_base.base_config()  # fmnist U-Net: 32, 64, 64 channels; attention at 7
  config_validation.validate(config, image_shape=(28, 28, 1))
  return config


@pytest.mark.parametrize('change,message', [
    (dict(w_embedding='inv_cos'), r"model.w_embedding='inv_cos': expected one of "
                                  r"\('fourier', 'authors'\)$"),
    (dict(w_warmup_steps=-1), r'model.w_warmup_steps=-1: expected an integer >= 0'),
    (dict(w_warmup_steps=1.5), r'model.w_warmup_steps=1.5: expected an integer >= 0'),
    (dict(attn_head_dim=-8), r'model.attn_head_dim=-8: expected an integer >= 0'),
    (dict(attn_head_dim=True), r'model.attn_head_dim=True: expected an integer >= 0'),
    (dict(attn_head_dim=24), r'model.attn_head_dim=24: expected a divisor of the channels of '
                             r'every attention block \(64 at the middle block\)$'),
    (dict(attn_head_dim=64, attn_resolutions=(28,)),
     r'model.attn_head_dim=64: expected a divisor of the channels of every attention block '
     r'\(32 at resolution 28\)$'),
    (dict(resblock_resample='yes'), r"model.resblock_resample='yes': expected True or False$"),
])
def test_bad_values_raise_one_line_errors(change, message):
  config = _fmnist()
  # A section of any types (a config file may replace it whole).
  config.model = type(config.model)(dict(config.model.to_dict(), **change))
  with pytest.raises(config_validation.ConfigError, match=f'^{message}') as e:
    config_validation.validate(config, image_shape=(28, 28, 1))
  assert '\n' not in str(e.value)


def test_head_dim_checked_where_attention_runs():
  config = _fmnist()
  config.model.update(attn_head_dim=64)  # 64 channels at 7x7 and in the middle; 32 at 28x28
  config_validation.validate(config, image_shape=(28, 28, 1))
  config.model.attn_resolutions = (28,)
  config_validation.validate(config)  # which levels attend is known with the image size
  with pytest.raises(config_validation.ConfigError, match='32 at resolution 28'):
    config_validation.validate(config, image_shape=(28, 28, 1))


def test_unet_options_refused_for_the_dit_and_w_options_for_a_foreign_teacher():
  config = config_base.base_config()
  config.model = config_base.dit_model(size='tiny', patch_size=2, hidden_size=32, depth=2,
                                       num_heads=2, w_embedding='authors', w_warmup_steps=10)
  config_validation.validate(config, image_shape=(28, 28, 1))
  for key, value in (('attn_head_dim', 64), ('resblock_resample', True)):
    c = config_base.base_config()
    c.model = config_base.dit_model(size='tiny', patch_size=2, hidden_size=32, depth=2,
                                    num_heads=2)
    with c.unlocked():
      c.model[key] = value
    with pytest.raises(config_validation.ConfigError,
                       match=rf"^model.{key}={value!r}: expected no such key for "
                             rf"model.arch='dit'"):
      config_validation.validate(c)
  for key, value in (('w_embedding', 'authors'), ('w_warmup_steps', 10)):
    c = config_base.base_config()
    c.teacher.source = 'python:pkg.mod:factory'
    config_validation.validate(c)
    c.model[key] = value
    with pytest.raises(config_validation.ConfigError,
                       match=rf"^model.{key}={value!r}: expected .*teacher.source"):
      config_validation.validate(c)


# ---- the ImageNet-64 U-Net ------------------------------------------------------------------

# configs/imagenet64.py's model section at 64x64x3, 1000 classes (jax.eval_shape): the
# teacher and the student (w branch: 2 Dense layers, 738,816 parameters), without and with
# the authors' attn_head_dim=64 (same parameters) and resblock_resample=True (+18,710,208).
I64_COUNTS = {(False, False): 277_189_827, (False, True): 277_928_643,
              (True, False): 295_900_035, (True, True): 296_638_851}


@pytest.mark.parametrize('authors,use_w', sorted(I64_COUNTS))
def test_imagenet64_parameter_counts(authors, use_w):
  import importlib.util  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location('i64', os.path.join(root, 'configs',
                                                                    'imagenet64.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.update(attn_head_dim=64 if authors else 0, resblock_resample=authors)
  config.stages = ('teacher', 'stage1', 'stage2')  # eval would need Inception's weights
  config_validation.validate(config, image_shape=(64, 64, 3))
  net = networks.make_net(config, num_classes=1000, out_ch=3, use_w=use_w)
  count = networks.param_count(_abstract(net, (64, 64, 3)))
  assert count == I64_COUNTS[(authors, use_w)]


# ---- the warm-up in training: stage 1's loss gets the update count ------------------------

def test_stage1_warm_up_scales_the_w_branch_by_the_update_count():
  """With model.w_warmup_steps the stage-1 loss scales the student's w branch by
  min(1, step / warm-up): at step 0 it is the loss of the network without a w branch, at
  the end of the warm-up that of no warm-up; make_update_fn passes the state's step."""
  import functools  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from gdistill import denoiser, losses, train_state  # pylint: disable=g-import-not-at-top
  student_net = _build('unet', use_w=True, w_embedding='authors')
  params = random_like(_abstract(student_net), seed=3)
  # the same student with its w branch's last layer zero: the network without a w branch
  silent = dict(params, w_dense1=jax.tree.map(jnp.zeros_like, params['w_dense1']))
  student = denoiser.for_gdistill_net(student_net, mean_type='v', num_classes=K)
  teacher = denoiser.for_gdistill_net(_build('unet'), mean_type='v', num_classes=K)
  batch = {'image': jnp.tanh(jax.random.normal(jax.random.PRNGKey(1), (4, *SHAPE))),
           'label': jnp.arange(4, dtype=jnp.int32)}
  frozen, rng = {'params': random_like(_abstract(_build('unet')), seed=4)}, jax.random.PRNGKey(5)
  # w_min = 1: every example has w > 0, so the w branch matters
  loss = functools.partial(losses.stage1_loss, teacher=teacher, w_min=1.0, w_max=4.0,
                           weighting='snr_trunc')
  plain = jax.jit(lambda p: loss(p, frozen, batch, rng, student=student)[0])
  warm = jax.jit(lambda p, step: loss(p, frozen, batch, rng, student=student,
                                      w_warmup_steps=10, step=step)[0])
  no_branch, no_warmup = float(plain(silent)), float(plain(params))
  assert abs(no_branch - no_warmup) > 1e-4 * abs(no_warmup)
  np.testing.assert_allclose(float(warm(params, jnp.int32(0))), no_branch, rtol=1e-5)
  np.testing.assert_allclose(float(warm(params, jnp.int32(10))), no_warmup, rtol=1e-5)
  seen = []

  def spy(p, f, b, r, step=None):
    seen.append(step)
    return jnp.float32(0.0) * jax.tree.leaves(p)[0].sum(), {}
  state = train_state.init_state({'w': jnp.ones(2)}, optax.sgd(0.1), ema=False)
  update = train_state.make_update_fn(spy, optax.sgd(0.1), ema_decay=0.0, pass_step=True)
  update(state, {}, batch, rng)
  assert seen and seen[0] is not None
  train_state.make_update_fn(spy, optax.sgd(0.1), ema_decay=0.0)(state, {}, batch, rng)
  assert seen[-1] is None
