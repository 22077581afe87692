"""The U-Net's own GroupNorm and Dropout against Flax's, and the CPU compile options."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdistill import xla_options
from gdistill.models import unet


@pytest.mark.parametrize('shape,groups', [((4, 12, 12, 96), 32), ((3, 7, 7, 64), 32),
                                          ((2, 5, 5, 16), 16), ((2, 9, 48), 8)])
def test_group_norm_equals_flax_in_value_and_gradient(shape, groups):
  key = jax.random.PRNGKey(0)
  x = 3.0 * jax.random.normal(key, shape) + 1.5  # a mean the statistics must remove
  ref = nn.GroupNorm(groups)
  params = ref.init(key, x)
  params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(1), a.shape),
                        params)
  ours = unet.GroupNorm(groups)
  assert jax.tree.map(jnp.shape, ours.init(key, x)) == jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=2e-5)
  cube = lambda m: lambda p, x: (m.apply(p, x) ** 3).sum()  # noqa: E731
  got = jax.grad(cube(ours), argnums=(0, 1))(params, x)
  want = jax.grad(cube(ref), argnums=(0, 1))(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()))


def test_group_norm_folds_film_exactly():
  key = jax.random.PRNGKey(2)
  x = jax.random.normal(key, (3, 6, 6, 64))
  scale, shift = jax.random.normal(key, (2, 3, 64))
  params = nn.GroupNorm(32).init(key, x)
  want = nn.GroupNorm(32).apply(params, x) * (1.0 + scale[:, None, None]) + shift[:, None, None]
  np.testing.assert_allclose(unet.GroupNorm(32).apply(params, x, scale, shift), want, atol=2e-5)


def test_dropout_keeps_the_rate_scales_the_kept_and_follows_the_rng():
  x = jnp.ones((64, 16, 16, 32))
  drop = unet.Dropout(0.1)
  out = drop.apply({}, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(0)})
  kept = np.asarray(out) != 0
  assert abs(kept.mean() - 0.9) < 0.005, kept.mean()
  np.testing.assert_allclose(np.asarray(out)[kept], 1.0 / 0.9, rtol=1e-6)
  again = drop.apply({}, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(0)})
  other = drop.apply({}, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(1)})
  np.testing.assert_array_equal(out, again)
  assert (np.asarray(other) != np.asarray(out)).mean() > 0.1
  np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(unet.Dropout(0.0).apply({}, x, deterministic=False), x)


def test_cpu_compile_options_follow_the_config():
  class Config(dict):
    get = dict.get
  assert xla_options.compile_options(Config(cpu_xla_tuned=True), 'cpu') == xla_options.CPU_TUNED
  assert xla_options.compile_options(Config(cpu_xla_tuned=False), 'cpu') == {}
  assert xla_options.compile_options(Config(cpu_xla_tuned=True), 'gpu') == {}
  assert xla_options.compile_options(Config(), 'cpu') == xla_options.CPU_TUNED  # old workdirs


def _conv_weight_grad(x, w):
  conv = lambda w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',  # noqa: E731
                                                dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return jax.grad(lambda w: jnp.sum(conv(w) ** 2))(w)


def _ynnpack_weight_grad_convolutions(compiled) -> int:
  """Weight-gradient convolutions (XLA writes them with the image as the
  window, 28x28 here) inside the computations that YNNPACK fusions call."""
  text = compiled.as_text()
  called = re.findall(r'calls=%([\w.\-]+)[^\n]*__ynn_fusion', text)
  bodies = {m.group(1): m.group(2) for m in re.finditer(r'^%([\w.\-]+) .*?\{\n(.*?)\n\}', text,
                                                       re.M | re.S)}
  return sum(bodies.get(name, '').count('window={size=28x28') for name in called)


def test_tuned_options_move_weight_gradients_out_of_ynnpack_with_the_same_result():
  if jax.default_backend() != 'cpu':
    pytest.skip('CPU options')
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 28, 28, 64))
  w = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (3, 3, 64, 64))
  lowered = jax.jit(_conv_weight_grad).lower(x, w)
  default = xla_options.compile(lowered, {})
  tuned = xla_options.compile(lowered, xla_options.CPU_TUNED)
  if xla_options.CPU_TUNED and tuple(sorted(xla_options.CPU_TUNED.items())) in xla_options._rejected:
    pytest.skip('this jaxlib does not know the option')
  assert _ynnpack_weight_grad_convolutions(default) == 1
  assert _ynnpack_weight_grad_convolutions(tuned) == 0
  want = default(x, w)  # sums over 12544 terms in another order: float32 rounding
  np.testing.assert_allclose(tuned(x, w), want, rtol=1e-3, atol=1e-4 * float(jnp.abs(want).max()))


def test_rejected_options_fall_back_to_xla_defaults(caplog):
  lowered = jax.jit(lambda x: x * 2.0).lower(jnp.ones(3))
  compiled = xla_options.compile(lowered, {'xla_no_such_option_for_gdistill': True})
  np.testing.assert_array_equal(compiled(jnp.ones(3)), 2.0 * np.ones(3))
  assert 'XLA rejected the compile options' in caplog.text
