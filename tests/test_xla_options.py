"""CPU compile options: chosen by the config, rejected options and YNNPACK
fusions that would fail at run time fall back, results unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gdistill import xla_options


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
  return sum(line.count('window={size=28x28')
             for body in xla_options.ynn_fusion_bodies(compiled.as_text()).values()
             for line in body)


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


def _conv_silu_conv(x, w, scale, shift):
  conv = lambda v: jax.lax.conv_general_dilated(v, w, (1, 1), 'SAME',  # noqa: E731
                                                dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return conv(jax.nn.silu(conv(x) * scale + shift))


def test_ynnpack_fusions_that_would_fail_at_run_time_are_recompiled(devices8, caplog):
  """A convolution's output channels sharded 3 per device: XLA (jaxlib 0.10)
  gives the elementwise fusion after it a channel-major layout that YNNPACK
  rejects when the program first runs. gdistill finds it at compile time and
  recompiles with the fallback options, which run."""
  if jax.default_backend() != 'cpu':
    pytest.skip('CPU options')
  mesh = Mesh(np.array(devices8), ('data',))
  replicated = NamedSharding(mesh, P())
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.device_put(jax.random.normal(keys[0], (16, 16, 16, 24)), replicated)
  w = jax.device_put(0.1 * jax.random.normal(keys[1], (3, 3, 24, 24)),
                     NamedSharding(mesh, P(None, None, None, 'data')))
  scale = jax.device_put(1.0 + 0.1 * jax.random.normal(keys[2], (16, 1, 1, 24)), replicated)
  args = (x, w, scale, scale - 1.0)
  lowered = jax.jit(_conv_silu_conv).lower(*args)
  want = lowered.compile()(*args)
  try:
    raw = lowered.compile(compiler_options=dict(xla_options.CPU_TUNED))
  except jax.errors.JaxRuntimeError:
    pytest.skip('this jaxlib does not know the option')
  problems = xla_options.ynn_layout_problems(raw.as_text())
  if not problems:
    pytest.skip('this XLA lays the fusion out in a way YNNPACK takes')
  assert all('{2,1,0,3}' in p for p in problems), problems[:3]
  with pytest.raises(jax.errors.JaxRuntimeError, match='unsupported layout in YNN fusion'):
    np.asarray(raw(*args))  # the check agrees with XLA's own
  with caplog.at_level('INFO'):
    compiled = xla_options.compile(lowered, xla_options.CPU_TUNED)
  assert xla_options.ynn_layout_problems(compiled.as_text()) == []
  assert 'recompiling with' in caplog.text
  np.testing.assert_allclose(compiled(*args), want, rtol=1e-4, atol=1e-4)


def test_ynn_layout_check_reads_fusions_and_layouts():
  body = '''HloModule m

%fused_computation.1 (p: f32[2,3,4]) -> f32[2,3,4] {
  %p = f32[2,3,4]{2,1,0} parameter(0)
  %s = f32[] constant(2)
  %b = f32[2,3,4]{2,1,0} broadcast(%s), dimensions={}
  ROOT %m = f32[2,3,4]{2,1,0} multiply(%p, %b)
}

%fused_computation.2 (p: f32[2,3,4]) -> f32[2,3,4] {
  %p.1 = f32[2,3,4]{LAYOUT} parameter(0)
  ROOT %n = f32[2,3,4]{LAYOUT} negate(%p.1)
}

ENTRY %main (a: f32[2,3,4]) -> f32[2,3,4] {
  %a = f32[2,3,4]{2,1,0} parameter(0)
  %f1 = f32[2,3,4]{2,1,0} fusion(%a), kind=kCustom, calls=%fused_computation.1, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  ROOT %f2 = f32[2,3,4]{LAYOUT} fusion(%f1), kind=KIND, calls=%fused_computation.2, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
}
'''
  ok = body.replace('{LAYOUT}', '{2,1,0}').replace('KIND', 'kCustom')
  assert xla_options.ynn_layout_problems(ok) == []
  bad = body.replace('{LAYOUT}', '{1,2,0}').replace('KIND', 'kCustom')
  assert xla_options.ynn_layout_problems(bad) == [
      '%p.1 = f32[2,3,4]{1,2,0} parameter(0)', 'ROOT %n = f32[2,3,4]{1,2,0} negate(%p.1)']
  not_ynn = bad.replace('"__ynn_fusion"}}\n}', '"__other"}}\n}')
  assert xla_options.ynn_layout_problems(not_ynn) == []
  rank9 = ok.replace('%p.1 = f32[2,3,4]{2,1,0}', '%p.1 = f32[1,1,1,1,1,1,2,3,4]{8,7,6,5,4,3,2,1,0}')
  assert len(xla_options.ynn_layout_problems(rank9)) == 1
