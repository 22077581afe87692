"""Bytes per device of the teacher and stage-1 steps, with and without remat.

Compiles each step ahead of time on abstract inputs (nothing is created or
run), laid out as the driver lays them out (state and the frozen teacher by
``config.sharding``, the batch over the data axis, the state donated), once
with ``model.remat=False`` and once with ``True``, and prints XLA's memory
analysis of the compiled program per device: arguments, outputs, the part
of the outputs aliased to (donated) arguments, temporaries, and the peak
estimate argument + output - alias + temp (``common.memory_bytes``). The
stage-1 step is the heaviest (the student's state and backward pass and two
frozen teacher passes); stage 2 has the same network sizes. The batch per
device is ``--batch`` over the mesh's devices; on CPU fake the devices the
real run would have before JAX starts, e.g. ImageNet 64's 2048 over 16:

  GDISTILL_CPU_DEVICES=16 python benchmarks/memory.py --config configs/imagenet64.py

XLA:CPU plans memory for its own fusions and schedule; an accelerator's
compiler plans differently, so run it there for that device's numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import common  # pylint: disable=g-bad-import-order  # sets up sys.path and XLA_FLAGS first

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from gdistill import networks, sharding  # pylint: disable=g-import-not-at-top

STEPS = ('teacher', 'stage1')
FIELDS = ('argument', 'output', 'alias', 'temp', 'peak_estimate')


def with_remat(setup: common.Setup, remat: bool) -> common.Setup:
  """The setup with ``config.model.remat`` set, its networks rebuilt."""
  config = copy.deepcopy(setup.config)
  config.model.remat = remat
  mk = functools.partial(networks.make_net, config, num_classes=setup.num_classes,
                         out_ch=setup.image_shape[-1])
  return dataclasses.replace(setup, config=config, teacher_net=mk(use_w=False),
                             student_net=mk(use_w=True), params_cache={})


def _placed(abstract, mesh, strategy):
  """ShapeDtypeStructs of ``abstract`` carrying the shardings ``strategy`` gives them."""
  shardings = sharding.state_shardings(abstract, mesh, strategy)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def step_memory(setup: common.Setup, step: common.StepFn) -> tuple:
  """(``common.memory_bytes`` of the compiled step, compile seconds)."""
  mesh, strategy = setup.mesh, setup.config.sharding
  repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  state = _placed(jax.eval_shape(step.init_fn, step.frozen), mesh, strategy)
  data = {'image': jax.ShapeDtypeStruct((setup.batch, *setup.image_shape), jnp.float32,
                                        sharding=batch_sh),
          'label': jax.ShapeDtypeStruct((setup.batch,), jnp.int32, sharding=batch_sh)}
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)
  shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  jitted = jax.jit(step.update_fn,
                   in_shardings=(shardings(state), shardings(step.frozen), batch_sh, repl),
                   out_shardings=(shardings(state), repl), donate_argnums=(0,))
  compiled, seconds, _ = common.timed_compile(jitted, state, step.frozen, data, rng,
                                              options=setup.compile_options)
  return common.memory_bytes(compiled), seconds


def _steps(setup: common.Setup, which):
  if 'teacher' in which:
    yield common.teacher_step(setup)
  if 'stage1' in which:
    teacher = _placed(common.abstract_params(setup, setup.teacher_net, 0), setup.mesh,
                      setup.config.sharding)
    yield common.stage1_step(setup, teacher)


def run(setup: common.Setup, records: common.Records, *, which=STEPS) -> dict:
  per_device = setup.batch // setup.mesh.size
  mem, rows = {}, []
  for remat in (False, True):
    s = with_remat(setup, remat)
    for step in _steps(s, which):
      m, seconds = step_memory(s, step)
      mem[(step.name, remat)] = m
      print(f'{step.name} remat={remat}: compiled in {seconds:.1f}s; per device '
            + ', '.join(f'{k} {m.get(k, float("nan")) / 2**20:.1f} MiB' for k in FIELDS),
            flush=True)
      rows.append([step.name, 'on' if remat else 'off', per_device]
                  + [m.get(k, float('nan')) / 2**20 for k in FIELDS] + [seconds])
  common.table(f'Memory per device, XLA memory_analysis() on {jax.devices()[0].platform} '
               f'(batch {setup.batch} over {setup.mesh.size} devices; {setup.describe()})',
               ['step', 'remat', 'batch/device'] + [f'{k} MiB' for k in FIELDS] + ['compile s'],
               rows)
  for (name, remat), m in mem.items():
    tag = 'remat' if remat else 'no_remat'
    for k in ('temp', 'peak_estimate'):
      records.add(f'{name}_step_{k}_bytes_per_device_{tag}', m.get(k, float('nan')), 'bytes')
  for name in {n for n, _ in mem}:
    off, on = mem[(name, False)], mem[(name, True)]
    records.add(f'{name}_step_memory_remat_over_no_remat',
                on.get('peak_estimate', float('nan')) / off.get('peak_estimate', float('nan')),
                'ratio')
  return mem


def main():
  common.script_main(__doc__.splitlines()[0], run, STEPS, '')


if __name__ == '__main__':
  main()
