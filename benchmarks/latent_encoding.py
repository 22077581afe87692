"""Latent runs: encode the training batches on the fly, or once and store the latents?

For a latent config (``config.codec.path``), times each training step on latent batches
(what gdistill does: ``gdistill.data.latents`` stores the split's latents in the workdir
on a run's first start) beside the autoencoder's encoding of one such batch from pixels
(what every step would add if it encoded its batch on the fly), interleaved, and the
one-off cost of encoding the whole training split; then totals both over the config's
step counts.

  python benchmarks/latent_encoding.py --config configs/fashion_mnist_latent.py
"""

from __future__ import annotations

import common  # pylint: disable=g-bad-import-order  # sets up sys.path and XLA_FLAGS first

import time  # pylint: disable=g-import-not-at-top

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from gdistill import run_plan, sharding  # pylint: disable=g-import-not-at-top
from gdistill.data import latents as latents_lib  # pylint: disable=g-import-not-at-top

TRAIN_IMAGES = {'fashion_mnist': 60000, 'cifar10': 50000}


def run(setup: common.Setup, records: common.Records) -> dict:
  if setup.codec.is_identity:
    raise SystemExit(f'{setup.config_name}: a pixel config (codec.path is empty); expected a '
                     f'latent config such as configs/fashion_mnist_latent.py')
  rounds = 3 if setup.quick else 6
  mesh, batch, codec = setup.mesh, setup.batch, setup.codec
  pixels = common.random_batch(setup, batch)
  encode = jax.jit(codec.encode_with)
  codec_params = jax.device_put(codec.params, sharding.replicated(mesh))
  latents = {'image': encode(codec_params, pixels['image']), 'label': pixels['label']}
  rng = jax.device_put(jax.random.PRNGKey(0), sharding.replicated(mesh))

  fns = {'encode': lambda: encode(codec_params, pixels['image'])}
  teacher = common.teacher_params(setup)
  for step in (common.teacher_step(setup), common.stage1_step(setup, teacher),
               common.stage2_step(setup, common.student_params(setup))):
    state = step.build_state(mesh, setup.config.sharding)
    compiled, _, _ = step.compile(mesh, state, latents, rng, setup.compile_options)
    holder = {'state': state}

    def fn(compiled=compiled, step=step, holder=holder):
      holder['state'], metrics = compiled(holder['state'], step.frozen, latents, rng)
      return metrics
    for _ in range(2):
      common.block(fn())
    fns[step.name] = fn
  common.block(fns['encode']())
  times = common.interleaved_times(fns, rounds=rounds, min_seconds=0 if setup.quick else 10)

  # Encoding the training split once, in gdistill.data.latents' batches.
  n_images = TRAIN_IMAGES.get(setup.config.data.name, 50000)
  chunk = jax.device_put(np.zeros((latents_lib.ENCODE_BATCH, *setup.data_shape), np.float32),
                         sharding.batch_sharding(mesh))
  common.block(encode(codec_params, chunk))
  t0 = time.perf_counter()
  for _ in range(3):
    common.block(encode(codec_params, chunk))
  encode_all = (time.perf_counter() - t0) / 3 * n_images / latents_lib.ENCODE_BATCH

  c = setup.config
  counts = {'teacher': c.teacher.num_steps, 'stage1': c.stage1.num_steps,
            'stage2': sum(p.num_steps(c) for p in run_plan.from_config(c).of_kind(
                run_plan.STAGE2))}
  rows, on_the_fly = [], 0.0
  enc = times['encode']
  for kind in ('teacher', 'stage1', 'stage2'):
    on_the_fly += enc * counts[kind]
    rows.append([kind, batch, times[kind] * 1e3, enc * 1e3, enc / times[kind], counts[kind],
                 enc * counts[kind]])
    records.add(f'{kind}_step_ms', times[kind] * 1e3, 'ms')
  records.add('encode_batch_ms', enc * 1e3, 'ms')
  common.table(f'Latent training steps and the encoding of their batch ({setup.describe()})',
               ['step', 'batch', 'step ms (latents)', 'encode ms', 'encode / step',
                'steps in config', 'encode s over them'], rows)
  print(f'on the fly: {on_the_fly:.0f} s over the config\'s steps; stored: '
        f'{encode_all:.0f} s once for the {n_images} training images '
        f'({n_images * np.prod(setup.image_shape) * 4 / 2**20:.0f} MiB of float32 latents)')
  records.add('encode_training_split_s', encode_all, 's')
  records.add('on_the_fly_total_s', on_the_fly, 's')
  return {}


if __name__ == '__main__':
  common.script_main(__doc__.splitlines()[0], run)
