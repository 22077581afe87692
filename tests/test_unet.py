"""The U-Net: shapes, pinned parameter counts, the zero-initialised w branch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gd_testlib import perturb_params
from gdistill.models import unet
from gdistill.networks import init_params, param_count

K = 10  # classes


def _inputs(shape, batch=3, seed=0):
  kz, kl = jax.random.split(jax.random.PRNGKey(seed))
  z = jax.random.normal(kz, (batch, *shape))
  logsnr = jnp.linspace(-10.0, 10.0, batch)
  label = jnp.arange(batch, dtype=jnp.int32) % (K + 1)
  return z, logsnr, label


def _params(net, shape):
  return jax.eval_shape(lambda r: init_params(net, r, shape), jax.random.PRNGKey(0))


SHAPE = (8, 8, 1)


@pytest.fixture(scope='module')
def tiny(tiny_nets):
  return dict(tiny_nets, params=perturb_params(tiny_nets['fresh'], seed=1))


def test_base_params_are_w_params_less_w_branch(tiny):
  """conftest derives the fresh no-w params from the w model's init."""
  want = _params(tiny['base'], SHAPE)
  assert jax.tree.structure(tiny['fresh']) == jax.tree.structure(want)
  assert jax.tree.map(lambda a: a.shape, tiny['fresh']) == jax.tree.map(lambda a: a.shape, want)


def test_fresh_network_predicts_zero(tiny):
  """Zero-initialised output conv: a fresh network predicts exactly 0."""
  out = tiny['apply'](tiny['fresh'], *_inputs(SHAPE, batch=4))
  assert out.shape == (4, *SHAPE) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize('shape', [(28, 28, 1), (32, 32, 3), (16, 8, 2)])
def test_tiny_output_shape(shape):
  net = unet.build_unet(size='tiny', num_classes=K, out_ch=shape[-1])
  out = jax.eval_shape(lambda p: net.apply({'params': p}, *_inputs(shape)), _params(net, shape))
  assert out.shape == (3, *shape) and out.dtype == jnp.float32


@pytest.mark.parametrize('use_w', [False, True])
def test_fmnist_output_shape(use_w):
  net = unet.build_unet(size='fmnist', num_classes=K, out_ch=1, use_w=use_w)
  z, logsnr, label = _inputs((28, 28, 1))
  kw = {'w': jnp.ones((3,))} if use_w else {}
  out = jax.eval_shape(lambda p: net.apply({'params': p}, z, logsnr, label, **kw),
                       _params(net, (28, 28, 1)))
  assert out.shape == (3, 28, 28, 1) and out.dtype == jnp.float32


# Pinned: a change here changes every checkpoint of that size.
PARAM_COUNTS = {
    ('tiny', False): 178_209,
    ('tiny', True): 183_457,
    ('fmnist', False): 1_744_289,
    ('fmnist', True): 1_765_025,
}


@pytest.mark.parametrize('size,use_w', sorted(PARAM_COUNTS))
def test_parameter_counts(size, use_w):
  net = unet.build_unet(size=size, num_classes=K, out_ch=1, use_w=use_w)
  assert param_count(_params(net, (28, 28, 1))) == PARAM_COUNTS[(size, use_w)]


def test_w_branch_is_exactly_two_dense_layers():
  """use_w adds Dense(ch -> 4ch) and Dense(4ch -> 4ch) and nothing else."""
  for size, ch in (('tiny', 16), ('fmnist', 32)):
    extra = PARAM_COUNTS[(size, True)] - PARAM_COUNTS[(size, False)]
    assert extra == (ch * 4 * ch + 4 * ch) + (4 * ch * 4 * ch + 4 * ch)


def test_class_embedding_has_null_row():
  net = unet.build_unet(size='tiny', num_classes=K, out_ch=1)
  params = _params(net, SHAPE)
  assert params['class_embed']['embedding'].shape == (K + 1, 4 * 16)


def test_null_label_and_classes_change_the_output(tiny):
  z, logsnr, _ = _inputs(SHAPE, batch=3)
  z, logsnr = jnp.repeat(z[:1], 3, 0), jnp.repeat(logsnr[:1], 3, 0)
  out = tiny['apply'](tiny['params'], z, logsnr, jnp.array([0, 1, K]))
  assert not np.allclose(out[0], out[1], atol=1e-4)
  assert not np.allclose(out[0], out[2], atol=1e-4)


def test_use_w_with_zero_init_equals_model_without_w(tiny):
  flat = traverse_util.flatten_dict(tiny['fresh_w'])
  np.testing.assert_array_equal(flat[('w_dense1', 'kernel')], 0.0)
  np.testing.assert_array_equal(flat[('w_dense1', 'bias')], 0.0)
  assert np.abs(flat[('w_dense0', 'kernel')]).max() > 0  # only the last layer is zero
  flat.update(traverse_util.flatten_dict(tiny['params']))
  p_w = traverse_util.unflatten_dict(flat)

  z, logsnr, label = _inputs(SHAPE, batch=4)
  want = tiny['apply'](tiny['params'], z, logsnr, label)
  assert np.abs(want).max() > 1e-2
  for w in (0.0, 1.5, 4.0):
    got = tiny['apply_w'](p_w, z, logsnr, label, jnp.full((4,), w))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

  # Once the last w layer is trained, w changes the output.
  p_w2 = perturb_params(p_w, seed=3)
  a = tiny['apply_w'](p_w2, z, logsnr, label, jnp.zeros((4,)))
  b = tiny['apply_w'](p_w2, z, logsnr, label, jnp.full((4,), 2.0))
  assert not np.allclose(a, b, atol=1e-4)


def test_relative_w_branch_adds_nothing_at_w0_once_trained(tiny):
  """``w_relative``: at w = 0 a student with the teacher's weights and a trained w branch
  still computes the teacher exactly; at other w the branch acts."""
  net = unet.build_unet(size='tiny', num_classes=K, out_ch=SHAPE[-1], use_w=True,
                        w_relative=True)
  flat = traverse_util.flatten_dict(perturb_params(tiny['fresh_w'], seed=3))  # trained branch
  flat.update(traverse_util.flatten_dict(tiny['params']))
  p_w = traverse_util.unflatten_dict(flat)
  z, logsnr, label = _inputs(SHAPE, batch=4)
  want = tiny['apply'](tiny['params'], z, logsnr, label)
  apply = jax.jit(lambda p, w: net.apply({'params': p}, z, logsnr, label, w))
  np.testing.assert_allclose(apply(p_w, jnp.zeros((4,))), want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(apply(p_w, jnp.full((4,), 2.0)), want, atol=1e-4)
  # The same parameters as the absolute branch: switching is a change of function only.
  assert jax.tree.structure(p_w) == jax.tree.structure(tiny['fresh_w'])


def test_w_argument_must_match_use_w():
  z, logsnr, label = _inputs(SHAPE)
  with_w = unet.build_unet(size='tiny', num_classes=K, out_ch=1, use_w=True)
  base = unet.build_unet(size='tiny', num_classes=K, out_ch=1)
  with pytest.raises(ValueError, match='use_w=True'):
    jax.eval_shape(lambda r: with_w.init(r, z, logsnr, label), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='use_w=False'):
    jax.eval_shape(lambda r: base.init(r, z, logsnr, label, w=jnp.ones((3,))),
                   jax.random.PRNGKey(0))


def test_build_unet_rejects_unknown_size_and_applies_overrides():
  with pytest.raises(ValueError, match="model.size='huge'"):
    unet.build_unet(size='huge', num_classes=K, out_ch=1)
  net = unet.build_unet(size='tiny', num_classes=K, out_ch=1, ch=8, ch_mult=[1, 2, 2])
  assert net.ch == 8 and net.ch_mult == (1, 2, 2) and net.num_res_blocks == 1
  assert unet.UNetTiny(num_classes=K, out_ch=1).ch == unet.SIZES['tiny']['ch']


@pytest.mark.slow  # CI time (see README: slow tests)
def test_remat_keeps_parameters_outputs_and_gradients():
  """``remat=True`` (nn.remat per block) changes what the backward pass keeps,
  nothing else: the same parameter names (checkpoints load either way), the
  same output and the same gradients, with dropout drawn under remat and an
  attention block in the network."""
  kw = dict(size='tiny', num_classes=K, out_ch=1, use_w=True, dropout=0.3, attn_resolutions=(4,))
  plain = unet.build_unet(**kw)
  remat = unet.build_unet(**kw, remat=True)
  params = jax.jit(lambda r: init_params(plain, r, SHAPE))(jax.random.key(0, impl='rbg'))
  params = perturb_params(params, seed=2)  # zero-initialised layers made non-zero
  assert jax.tree.structure(_params(remat, SHAPE)) == jax.tree.structure(params)
  assert 'down_1_attn_0' in params and 'mid_attn' in params

  z, logsnr, label = _inputs(SHAPE, batch=4)
  w = jnp.linspace(0.0, 4.0, 4)

  def loss(net, p, rng):
    out = net.apply({'params': p}, z, logsnr, label, w, train=True, rngs={'dropout': rng})
    return jnp.mean(jnp.square(out - z)), out

  results = {}
  for name, net in (('plain', plain), ('remat', remat)):
    grad_fn = jax.jit(jax.grad(functools.partial(loss, net), has_aux=True))
    results[name] = grad_fn(params, jax.random.PRNGKey(7))
  (g_plain, out_plain), (g_remat, out_remat) = results['plain'], results['remat']
  assert np.abs(out_plain).max() > 1e-2
  np.testing.assert_allclose(out_remat, out_plain, rtol=1e-6, atol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               g_remat, g_plain)
  # Dropout is live: another key gives another output.
  other = jax.jit(functools.partial(loss, remat))(params, jax.random.PRNGKey(8))[1]
  assert not np.allclose(other, out_remat, atol=1e-4)
