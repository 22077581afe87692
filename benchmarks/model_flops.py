"""Model FLOPs of the teacher, stage-1 and stage-2 training steps, without running them.

Lowers each step on abstract inputs (no parameters are created, nothing is
compiled) and prints XLA's flop count of the whole program, per step and per
image. It is the numerator of train_steps.py's peak fraction, and it lets a
step time measured elsewhere (an accelerator) be turned into a fraction of
that machine's peak:

  python benchmarks/model_flops.py --config configs/imagenet64.py --batch 128
"""

from __future__ import annotations

import common  # pylint: disable=g-bad-import-order  # sets up sys.path and XLA_FLAGS first

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top


def step_flops(setup: common.Setup, step: common.StepFn, batch: int) -> float:
  state = jax.eval_shape(step.init_fn, step.frozen)
  data = {'image': jax.ShapeDtypeStruct((batch, *setup.image_shape), jnp.float32),
          'label': jax.ShapeDtypeStruct((batch,), jnp.int32)}
  rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  return common.cost_flops(jax.jit(step.update_fn).lower(state, step.frozen, data, rng))


def run(setup: common.Setup, records: common.Records) -> dict:
  t_params = common.abstract_params(setup, setup.teacher_net, 0)
  s_params = common.abstract_params(setup, setup.student_net, 1)
  steps = [common.teacher_step(setup), common.stage1_step(setup, t_params),
           common.stage2_step(setup, s_params)]
  flops = {s.name: step_flops(setup, s, setup.batch) for s in steps}
  rows = [[n, setup.batch, f / 1e9, f / setup.batch / 1e9, f / flops['teacher']]
          for n, f in flops.items()]
  common.table(f'Model FLOPs per training step ({setup.describe()})',
               ['step', 'batch', 'GFLOP/step', 'GFLOP/image', 'x teacher'], rows)
  for n, f in flops.items():
    records.add(f'{n}_step_flops', f, 'FLOP')
  return flops


if __name__ == '__main__':
  common.script_main(__doc__.splitlines()[0], run)
