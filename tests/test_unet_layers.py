"""The U-Net's own GroupNorm and Dropout against Flax's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdistill.models import unet


@pytest.mark.parametrize('shape,groups', [
    ((4, 12, 12, 96), 32),  # 12 s each: one in the fast suite, the other shapes slow
    pytest.param((3, 7, 7, 64), 32, marks=pytest.mark.slow),
    pytest.param((2, 5, 5, 16), 16, marks=pytest.mark.slow),
    pytest.param((2, 9, 48), 8, marks=pytest.mark.slow)])
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
