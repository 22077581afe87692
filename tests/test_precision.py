"""``config.precision='bfloat16'``: bf16 convolutions and matmuls, float32
parameters and optimiser state, and a loss that stays finite and close to the
float32 one on the smoke config's U-Net."""

from __future__ import annotations

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdistill import losses, networks
from gdistill.denoiser import for_gdistill_net
from gdistill.train_state import init_state, make_optimizer, make_update_fn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SHAPE, NUM_CLASSES = (28, 28, 1), 10  # Fashion-MNIST, the smoke config's data


def smoke_config(precision):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('smoke', os.path.join(REPO, 'configs', 'smoke.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.precision = precision
  return config


def nets(precision):
  config = smoke_config(precision)
  net = networks.make_net(config, num_classes=NUM_CLASSES, out_ch=IMAGE_SHAPE[-1], use_w=False)
  return config, net


@functools.lru_cache(maxsize=None)
def _init_fn(net):
  # Jitted: an eager Flax init compiles every primitive on its own (slow on CPU).
  return jax.jit(functools.partial(networks.init_params, net, image_shape=IMAGE_SHAPE))


def init(net, seed=0):
  return _init_fn(net)(jax.random.PRNGKey(seed))


def nontrivial_params(net, seed=0):
  """Initial params with the zero-initialised layers made random, so that the
  network's output (and the loss) depends on every layer."""
  params = init(net, seed)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  leaves = [0.05 * jax.random.normal(k, p.shape, p.dtype) if not np.any(p) and p.ndim > 1 else p
            for k, p in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, leaves)


def batch(seed=0, size=8):
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.uniform(-1, 1, (size, *IMAGE_SHAPE)), jnp.float32),
          'label': jnp.asarray(rng.integers(0, NUM_CLASSES, (size,)), jnp.int32)}


def _inputs(size=4):
  return (jnp.zeros((size, *IMAGE_SHAPE)), jnp.zeros((size,)), jnp.zeros((size,), jnp.int32))


def test_bfloat16_parameters_stay_float32():
  _, net32 = nets('float32')
  _, net16 = nets('bfloat16')
  p32 = init(net32)
  p16 = init(net16)
  assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.float32)}
  # Same tree, same initial values: precision changes the compute only.
  jax.tree.map(np.testing.assert_array_equal, p32, p16)
  out = jax.jit(lambda p, *a: net16.apply({'params': p}, *a))(p16, *_inputs())
  assert out.dtype == jnp.float32  # the U-Net hands back float32


def _ops(net, params, op):
  """Result element types of every ``op`` in the lowered StableHLO of a forward pass."""
  text = jax.jit(lambda p, *a: net.apply({'params': p}, *a)).lower(params, *_inputs()).as_text()
  lines = [l for l in text.splitlines() if f'stablehlo.{op}' in l]
  return [re.findall(r'->\s*tensor<[^>]*x(\w+)>', l)[-1] for l in lines]


def test_bfloat16_convolutions_and_matmuls_compute_in_bf16():
  _, net16 = nets('bfloat16')
  _, net32 = nets('float32')
  p = init(net16)
  convs16, dots16 = _ops(net16, p, 'convolution'), _ops(net16, p, 'dot_general')
  assert convs16 and set(convs16) == {'bf16'}, convs16
  assert dots16 and 'bf16' in dots16  # residual-block FiLM projections etc.
  assert set(_ops(net32, p, 'convolution')) == {'f32'}


@pytest.mark.parametrize('remat', [False, True])
def test_bfloat16_activations_stay_bf16_between_layers(remat):
  """What every norm, residual block, attention block and convolution of the
  bf16 U-Net hands on is bf16 (the norm's statistics are float32 inside it):
  no float32 copy of an activation flows between layers, to be kept for the
  backward pass. Only the network's output is float32. Traced, not compiled."""
  config = smoke_config('bfloat16')
  config.model.update(attn_resolutions=(14,), remat=remat)
  net = networks.make_net(config, num_classes=NUM_CLASSES, out_ch=IMAGE_SHAPE[-1], use_w=False)
  params = jax.eval_shape(lambda r: networks.init_params(net, r, IMAGE_SHAPE),
                          jax.random.PRNGKey(0))
  out, state = jax.eval_shape(
      lambda p: net.apply({'params': p}, *_inputs(), capture_intermediates=True,
                          mutable=['intermediates']), params)
  assert out.dtype == jnp.float32
  found = {}
  for path, x in jax.tree_util.tree_leaves_with_path(state['intermediates']):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if names[:-1] and x.ndim == 4:  # an image-shaped output of a layer (not the U-Net's own)
      found['/'.join(names[:-1])] = x.dtype
  last = [name.rsplit('/', 1)[-1] for name in found]
  assert any(n.startswith('norm') for n in last), sorted(found)  # GroupNorm (+ FiLM)
  assert any('_block_' in n for n in last) and 'mid_attn' in last, sorted(found)
  assert any(n.startswith('conv') for n in last), sorted(found)
  promoted = {k: str(v) for k, v in found.items() if v != jnp.bfloat16}
  assert not promoted, promoted


def test_bfloat16_loss_finite_and_close_to_float32():
  """Teacher loss of the same params, batch and rng in both precisions."""
  values = {}
  for precision in ('float32', 'bfloat16'):
    config, net = nets(precision)
    loss = functools.partial(losses.teacher_loss, net=for_gdistill_net(
        net, mean_type=config.diffusion.mean_type, num_classes=NUM_CLASSES),
                             p_uncond=config.teacher.p_uncond, weighting=config.diffusion.weighting)
    params = nontrivial_params(net)
    values[precision] = float(jax.jit(lambda p: loss(p, {}, batch(), jax.random.PRNGKey(3))[0])(
        params))
  assert np.isfinite(values['bfloat16'])
  np.testing.assert_allclose(values['bfloat16'], values['float32'], rtol=2e-2)


@pytest.mark.slow  # CI time (see README: slow tests)
def test_bfloat16_training_steps_keep_float32_state_and_track_float32():
  """A few Adam steps of the smoke config's teacher: the bf16 run's losses stay
  finite and close to the float32 run's; params and Adam moments stay float32."""
  traj = {}
  for precision in ('float32', 'bfloat16'):
    config, net = nets(precision)
    c = config.teacher
    opt = make_optimizer(learning_rate=c.learning_rate, warmup_steps=0, total_steps=10,
                         decay='constant', grad_clip=c.grad_clip)
    loss = functools.partial(losses.teacher_loss, net=for_gdistill_net(
        net, mean_type=config.diffusion.mean_type, num_classes=NUM_CLASSES),
                             p_uncond=c.p_uncond, weighting=config.diffusion.weighting)
    update = jax.jit(make_update_fn(loss, opt, ema_decay=0.9))
    state = init_state(nontrivial_params(net), opt, ema=True)
    rng = jax.random.PRNGKey(5)
    traj[precision] = []
    for step in range(4):
      state, metrics = update(state, {}, batch(step), rng)
      traj[precision].append(float(metrics['loss']))
    dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state, state.ema_params))
              if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}, (precision, dtypes)
  assert np.all(np.isfinite(traj['bfloat16'])), traj
  np.testing.assert_allclose(traj['bfloat16'], traj['float32'], rtol=3e-2)


@pytest.mark.parametrize('precision', ['float16', 'bf16'])
def test_unknown_precision_is_a_config_error(precision):
  from gdistill import config_validation  # pylint: disable=g-import-not-at-top
  with pytest.raises(config_validation.ConfigError, match='precision'):
    config_validation.validate(smoke_config(precision))


def test_upsample_is_nearest_resize():
  """The U-Net's broadcast upsampling equals jax.image.resize 'nearest' exactly."""
  from gdistill.models import unet  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 5, 3))
  np.testing.assert_array_equal(unet.upsample_nearest_2x(x),
                                jax.image.resize(x, (2, 14, 10, 3), method='nearest'))
