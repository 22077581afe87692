"""One update step is the same on 1 and 8 devices, and under FSDP and
replication; golden FSDP PartitionSpecs; the step traces once."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from gd_testlib import random_like
from gdistill import losses, loop, sharding
from gdistill.denoiser import for_gdistill_net
from gdistill.models import unet
from gdistill.networks import init_params
from gdistill.train_state import TrainState, init_state, make_optimizer, make_update_fn

K, SHAPE, BATCH = 10, (8, 8, 1), 16
# A one-level U-Net with only the middle blocks and one up block: it compiles
# fast, and with ch=32 its 3x3 convs (9216 weights) are large enough for FSDP
# to split.
NET_KW = dict(size='tiny', num_classes=K, out_ch=1, ch=32, ch_mult=(1,), num_res_blocks=0)


def _abstract_params(net, shape=SHAPE):
  return jax.eval_shape(lambda r: init_params(net, r, shape), jax.random.PRNGKey(0))


def _batch():
  rng = np.random.default_rng(0)
  return {'image': jnp.asarray(rng.uniform(-1, 1, (BATCH, *SHAPE)), jnp.float32),
          'label': jnp.asarray(rng.integers(0, K, BATCH), jnp.int32)}


def _optimizer():
  # No warm-up: the first step moves the parameters.
  return make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=10, decay='linear',
                        grad_clip=1.0)


def _place(state, teacher, mesh, strategy):
  """The state and teacher laid out as loop.init_state lays them; the batch split."""
  state_sh = sharding.state_shardings(jax.eval_shape(lambda: state), mesh, strategy)
  # Through host memory: fresh buffers, so donating them never deletes a fixture's arrays.
  state = jax.device_put(jax.device_get(state), state_sh)
  teacher = jax.device_put(
      teacher, sharding.state_shardings(jax.eval_shape(lambda: teacher), mesh, strategy))
  batch = jax.device_put(_batch(), sharding.batch_sharding(mesh))
  rng = jax.device_put(jax.random.PRNGKey(42), sharding.replicated(mesh))
  return state, teacher, batch, rng


def _ctx(mesh, strategy):
  return loop.LoopContext(workdir='', mesh=mesh, source=None, seed=0, strategy=strategy,
                          writer=None, log_every=1)


def _phase(name, update_fn, frozen):
  return loop.Phase(name=name, num_steps=1, batch_size=BATCH, init_fn=None, update_fn=update_fn,
                    frozen=frozen, meta={}, checkpoint_every=1)


def _host_state(params, *, ema):
  """init_state compiled once (eagerly it costs a compilation per leaf), on the host."""
  return jax.device_get(jax.jit(lambda p: init_state(p, _optimizer(), ema=ema))(params))


def _one_step(update_fn, state, frozen, mesh, strategy):
  """One step through loop.compile_step (AOT, donated state), returns host values."""
  state, frozen, batch, rng = _place(state, frozen, mesh, strategy)
  step = loop.compile_step(_phase('test', update_fn, frozen), _ctx(mesh, strategy), state, batch,
                           rng)
  new_state, metrics = step(state, frozen, batch, rng)
  return jax.device_get(new_state), jax.device_get(metrics)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-4):
  # Adam's first update is lr * g / (|g| + eps): where |g| is near eps, the
  # device-count-dependent reduction order of g changes the update by a few percent of
  # lr (1e-3 here). The losses and gradient norms are compared at rtol 1e-5 separately.
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


# ---- teacher: 8 devices == 1 device ---------------------------------------------------------

@pytest.fixture(scope='module')
def teacher_setup():
  net = unet.build_unet(**NET_KW)
  params = random_like(_abstract_params(net), seed=1, scale=0.05)
  loss = functools.partial(losses.teacher_loss,
                           net=for_gdistill_net(net, mean_type='v', num_classes=K),
                           p_uncond=0.2, weighting='snr_trunc')
  return dict(net=net, params=params, state=_host_state(params, ema=True),
              update=make_update_fn(loss, _optimizer(), ema_decay=0.9))


@pytest.fixture(scope='module')
def one_device_steps(teacher_setup, devices8):
  """Two teacher steps on one device, jitted as the loop jits (shardings,
  donation), with a trace counter: (state and metrics after step 1, after step 2)."""
  s = teacher_setup
  mesh = sharding.make_mesh({'data': -1}, devices8[:1])
  state, teacher, batch, rng = _place(s['state'], {}, mesh, 'replicated')
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  repl = sharding.replicated(mesh)
  traced = chex.assert_max_traces(s['update'], n=1)
  update = jax.jit(traced, in_shardings=(state_sh, repl, sharding.batch_sharding(mesh), repl),
                   out_shardings=(state_sh, repl), donate_argnums=(0,))
  state, m1 = update(state, teacher, batch, rng)
  first = jax.device_get((state, m1))  # before the next call donates it
  state, m2 = update(state, teacher, batch, rng)  # a retrace would raise here
  chex.clear_trace_counter()
  return first, jax.device_get((state, m2))


def test_teacher_step_same_on_1_and_8_devices(teacher_setup, one_device_steps, devices8):
  s = teacher_setup
  mesh8 = sharding.make_mesh({'data': -1}, devices8)
  st8, m8 = _one_step(s['update'], s['state'], {}, mesh8, 'replicated')
  st1, m1 = one_device_steps[0]
  assert int(st8.step) == int(st1.step) == 1
  np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  np.testing.assert_allclose(m8['grad_norm'], m1['grad_norm'], rtol=1e-5)
  _assert_trees_close(st8.params, st1.params)
  _assert_trees_close(st8.ema_params, st1.ema_params)
  _assert_trees_close(st8.opt_state, st1.opt_state)
  # The step moved every parameter (Adam's first step: lr g / (|g| + 1e-8),
  # about lr = 1e-3 unless the gradient is tiny).
  moved = jax.tree.leaves(
      jax.tree.map(lambda a, b: float(np.abs(a - b).max()), st1.params, s['params']))
  assert min(moved) > 1e-6 and np.median(moved) > 9e-4, moved


def test_update_fn_traces_once_over_two_steps(one_device_steps):
  """Step 2 reused step 1's trace (the fixture's chex.assert_max_traces(n=1)),
  and drew new noise: the rng is fold_in(rng, step)."""
  (st1, m1), (st2, m2) = one_device_steps
  assert int(st1.step) == 1 and int(st2.step) == 2
  assert float(m1['loss']) != float(m2['loss'])


# ---- stage 2: FSDP == replicated on 8 devices --------------------------------------------------

@pytest.mark.slow  # CI time (see README: slow tests)
def test_stage2_step_same_under_fsdp_and_replicated(devices8):
  net = unet.build_unet(**NET_KW, use_w=True)
  abstract = _abstract_params(net)
  student = random_like(abstract, seed=2, scale=0.05)
  teacher_params = random_like(abstract, seed=3, scale=0.05)
  loss = functools.partial(losses.stage2_loss,
                           student=for_gdistill_net(net, mean_type='v', num_classes=K),
                           w_min=0.0, w_max=4.0, grid='both', weighting='snr_trunc')
  update = make_update_fn(loss, _optimizer(), ema_decay=0.0)
  mesh = sharding.make_mesh({'data': -1}, devices8)
  state = _host_state(student, ema=False)
  out = {}
  for strategy in ('fsdp', 'replicated'):
    teacher = {'params': teacher_params, 'num_steps': np.int32(4)}
    out[strategy] = _one_step(update, state, teacher, mesh, strategy)
  (fs, fm), (rs, rm) = out['fsdp'], out['replicated']
  np.testing.assert_allclose(fm['loss'], rm['loss'], rtol=1e-5)
  assert float(fm['loss']) > 0
  np.testing.assert_allclose(fm['grad_norm'], rm['grad_norm'], rtol=1e-5)
  # Adam's moments hold the gradients themselves: tight. The parameters after
  # Adam's first update (lr * g / (|g| + eps)) may differ by a good part of lr
  # where |g| is near eps (a gradient of ~1e-8 here), hence the wider atol.
  _assert_trees_close(fs.opt_state, rs.opt_state, rtol=1e-4, atol=1e-7)
  _assert_trees_close(fs.params, rs.params, atol=3e-4)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), rs.params, student)
  assert np.median(jax.tree.leaves(moved)) > 1e-4


def test_stage2_halvings_share_one_compilation(devices8):
  """Phases with the same update function and signatures reuse the compiled step."""
  mesh = sharding.make_mesh({'data': -1}, devices8[:1])
  update = lambda state, teacher, batch, rng: (state, {'loss': jnp.float32(0)})
  state = _host_state({'w': np.ones((4,), np.float32)}, ema=False)
  compiled = []
  for n in (4, 2):
    teacher = {'params': {'w': np.ones((4,), np.float32)}, 'num_steps': np.int32(n)}
    st, teacher, batch, rng = _place(state, teacher, mesh, 'replicated')
    compiled.append(loop.compile_step(_phase(f'stage2_n{n:04d}', update, teacher),
                                      _ctx(mesh, 'replicated'), st, batch, rng))
  assert compiled[0] is compiled[1]


# ---- golden FSDP PartitionSpecs -----------------------------------------------------------------

def _reference_fsdp_spec(shape, axis_size=8, min_size=4096):
  """The FSDP rule of sharding.py, written out independently: arrays of at least
  ``min_size`` elements are split on their largest dimension divisible by the
  axis size, the last such dimension on ties; others are replicated."""
  if int(np.prod(shape)) < min_size:
    return P()
  dims = [d for d, n in enumerate(shape) if n % axis_size == 0]
  if not dims:
    return P()
  best = max(dims, key=lambda d: (shape[d], d))
  return P(*[sharding.DATA_AXIS if d == best else None for d in range(len(shape))])


GOLDEN_TINY_FSDP = {  # the tiny U-Net (ch 16, mult (1, 2)), 28x28x1, 10 classes, use_w
    'class_embed/embedding': P(),                              # (11, 64): small
    'conv_in/kernel': P(),                                     # (3, 3, 1, 16): small
    'temb_dense0/kernel': P(),                                 # (16, 64): small
    'temb_dense1/kernel': P(None, 'data'),                     # (64, 64): tie -> last
    'w_dense1/kernel': P(None, 'data'),                        # (64, 64)
    'down_0_block_0/conv1/kernel': P(),                        # (3, 3, 16, 16): 2304
    'down_1_block_0/conv1/kernel': P(None, None, None, 'data'),  # (3, 3, 16, 32)
    'down_1_block_0/conv2/kernel': P(None, None, None, 'data'),  # (3, 3, 32, 32): tie
    'up_1_block_0/conv1/kernel': P(None, None, 'data', None),  # (3, 3, 64, 32)
    'up_0_block_0/conv1/kernel': P(None, None, 'data', None),  # (3, 3, 48, 16)
    'up_1_block_0/temb_proj/kernel': P(None, 'data'),          # (64, 64)
    'up_0_block_0/temb_proj/kernel': P(),                      # (64, 32): 2048
    'mid_attn/qkv/kernel': P(),                                # (32, 96): 3072
    'mid_block_0/conv1/bias': P(),                             # (32,)
}


def test_fsdp_partition_specs_golden(devices8):
  net = unet.build_unet(size='tiny', num_classes=K, out_ch=1, use_w=True)
  abstract = _abstract_params(net, (28, 28, 1))
  state = jax.eval_shape(lambda p: init_state(p, _optimizer(), ema=True), abstract)
  mesh = sharding.make_mesh({'data': -1}, devices8)
  shard = sharding.state_shardings(state, mesh, 'fsdp')
  specs = {'/'.join(k): v.spec for k, v in traverse_util.flatten_dict(shard.params).items()}
  shapes = {'/'.join(k): v.shape for k, v in traverse_util.flatten_dict(state.params).items()}
  for name, want in GOLDEN_TINY_FSDP.items():
    assert specs[name] == want, (name, shapes[name], specs[name])
  for name, shape in shapes.items():
    assert specs[name] == _reference_fsdp_spec(shape), (name, shape, specs[name])
  assert sum(s != P() for s in specs.values()) == 20  # pinned: how much FSDP splits
  # EMA and Adam moments are laid out like the parameters; the step replicated.
  assert shard.step.spec == P()
  for tree in (shard.ema_params, shard.opt_state[1].mu, shard.opt_state[1].nu):
    assert jax.tree.map(lambda s: s.spec, tree) == jax.tree.map(lambda s: s.spec, shard.params)
  # Replicated strategy: nothing split.
  repl = sharding.state_shardings(state, mesh, 'replicated')
  assert all(s.spec == P() for s in jax.tree.leaves(repl))


def test_fsdp_spec_rules():
  assert sharding.fsdp_spec((4096,), 8) == P('data')
  assert sharding.fsdp_spec((4095,), 8) == P()
  assert sharding.fsdp_spec((3, 3, 64, 64), 1) == P()
  assert sharding.fsdp_spec((3, 3, 60, 70), 8) == P()  # nothing divisible
  assert sharding.fsdp_spec((8, 1024), 8) == P(None, 'data')
  assert sharding.fsdp_spec((1024, 8), 8) == P('data', None)
  assert sharding.fsdp_spec((), 8) == P()
  with pytest.raises(ValueError, match='sharding'):
    sharding.state_shardings({}, None, 'zero3')


def test_make_mesh(devices8):
  assert sharding.make_mesh({'data': -1}, devices8).shape == {'data': 8}
  assert sharding.make_mesh({'data': -1}, devices8[:1]).shape == {'data': 1}
  with pytest.raises(ValueError, match="'data' axis"):
    sharding.make_mesh({'model': -1}, devices8)
  with pytest.raises(ValueError, match='needs 16 devices'):
    sharding.make_mesh({'data': 16}, devices8)
  with pytest.raises(ValueError, match='not divisible'):
    sharding.make_mesh({'data': -1, 'model': 3}, devices8)


def test_train_state_eval_params():
  st = TrainState(step=jnp.int32(0), params={'a': 1}, opt_state=(), ema_params=None)
  assert st.eval_params == {'a': 1}
  assert st.replace(ema_params={'a': 2}).eval_params == {'a': 2}


def test_ema_warmup_forgets_the_initial_parameters():
  """With ema_warmup the EMA's decay at update k is min(decay, (1 + k) / (10 + k))."""
  import optax  # pylint: disable=g-import-not-at-top
  loss = lambda p, frozen, batch, rng: (jnp.sum((p['x'] - 1.0) ** 2), {})
  params = {'x': jnp.zeros(())}
  opt = optax.sgd(1.0)  # one step lands on x = 2, then oscillates: a visible target
  outs = {}
  for warmup in (False, True):
    update = jax.jit(make_update_fn(loss, opt, ema_decay=0.999, ema_warmup=warmup))
    state = init_state(params, opt, ema=True)
    state, _ = update(state, {}, {}, jax.random.PRNGKey(0))
    outs[warmup] = float(state.ema_params['x'])
  x1 = 2.0  # params after the first update
  assert outs[False] == pytest.approx(0.001 * x1)
  assert outs[True] == pytest.approx((1 - 2 / 11) * x1)  # decay (1 + 1) / (10 + 1)
