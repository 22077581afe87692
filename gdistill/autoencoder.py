"""Trains the autoencoder of a latent run and writes it as one codec file.

  python -m gdistill.autoencoder --config=configs/fashion_mnist_autoencoder.py --workdir=runs/ae

The autoencoder (``gdistill.models.autoencoder``, section ``autoencoder`` of the config)
trains through gdistill's loop (checkpoints, resume, preemption, progress) on the
config's dataset: per image, the squared reconstruction error summed over pixels plus
``kl_weight`` times the posterior's KL divergence from N(0, I) summed over latent
elements (Stable Diffusion's AutoencoderKL objective without its perceptual and GAN
terms), divided by the number of pixels. Then it is measured and written to
WORKDIR/autoencoder.msgpack (+ .json): the latent scale and shift (unit variance, zero
mean over ``scale_images`` training images), the reconstruction RMSE of the eval split,
and the FID of reconstructions against the real images' FID (the evaluation's feature
network and protocol: ``eval.num_samples`` images of the eval split, train-split
statistics). ``--output=FILE`` writes it elsewhere too (e.g. gdistill/weights/).
"""

from gdistill import cli_setup  # sets XLA_FLAGS before JAX starts; pylint: disable=unused-import

import functools  # pylint: disable=g-import-not-at-top
import os
import shutil
import time

from absl import app, flags
from ml_collections import config_flags

from gdistill import cli_setup as _cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Autoencoder config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and the codec file.')
_OUTPUT = flags.DEFINE_string('output', None, 'Also copy the codec file (and sidecar) here.')

PHASE = 'autoencoder'
FILE = 'autoencoder.msgpack'


def arch_of(section) -> dict:
  return {'ch': int(section.ch), 'ch_mult': tuple(int(m) for m in section.ch_mult),
          'num_res_blocks': int(section.num_res_blocks), 'latent_ch': int(section.latent_ch),
          'out_ch': int(section.out_ch)}


def loss_fn(params, frozen, batch, rng, *, module, kl_weight: float):
  """Per image: sum_pixels (x - x')^2 + kl_weight * sum_latent KL(q(z|x) || N(0, I)),
  averaged over the batch and divided by the pixels of an image."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  del frozen
  x = batch['image']
  recon, mean, logvar = module.apply({'params': params}, x, rng)
  sq = jnp.sum(jnp.square(recon - x), axis=(1, 2, 3))
  kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
  pixels = x.shape[1] * x.shape[2] * x.shape[3]
  loss = jnp.mean(sq + kl_weight * kl) / pixels
  return loss, {'recon_mse': jnp.mean(sq) / pixels, 'kl': jnp.mean(kl)}


def validate(config) -> None:
  from gdistill.config_validation import ConfigError  # pylint: disable=g-import-not-at-top
  a = config.get('autoencoder')
  if a is None:
    raise ConfigError('autoencoder: the config has no autoencoder section (expected a config '
                      'like configs/fashion_mnist_autoencoder.py)')
  for key in ('ch', 'num_res_blocks', 'latent_ch', 'out_ch', 'num_steps', 'batch_size',
              'checkpoint_every', 'scale_images'):
    v = a[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ConfigError(f'autoencoder.{key}={v!r}: expected a positive integer')
  mult = tuple(a.ch_mult)
  if not mult or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mult):
    raise ConfigError(f'autoencoder.ch_mult={mult!r}: expected positive integers, e.g. (1, 2)')
  if not a.kl_weight >= 0:
    raise ConfigError(f'autoencoder.kl_weight={a.kl_weight!r}: expected a number >= 0')
  if not a.learning_rate > 0:
    raise ConfigError(f'autoencoder.learning_rate={a.learning_rate!r}: expected a positive '
                      f'number')


def measure(codec, *, config, workdir: str, train_source, log) -> dict:
  """Scale and shift of the latents, reconstruction RMSE and FID (see the module doc)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gdistill.data import open_source  # pylint: disable=g-import-not-at-top
  from gdistill.eval import features, metrics, sweep  # pylint: disable=g-import-not-at-top

  a = config.autoencoder
  encode = jax.jit(codec.encode)
  decode = jax.jit(codec.decode)

  def batches(images_uint8, fn, batch=500):
    out = []
    for i in range(0, images_uint8.shape[0], batch):
      x = images_uint8[i:i + batch].astype(np.float32) / 127.5 - 1.0
      out.append(np.asarray(fn(x)))
    return np.concatenate(out)

  rng = np.random.default_rng(config.seed)
  idx = np.sort(rng.choice(train_source.num_examples, min(a.scale_images,
                                                        train_source.num_examples), replace=False))
  latents = batches(train_source.get(idx)['image'], encode)
  shift, std = float(latents.mean()), float(latents.std())
  log(f'autoencoder: latents of {idx.size} training images: mean {shift:.4f}, std {std:.4f}')

  e = config.eval
  eval_source = open_source(config.data.name, split=config.data.eval_split,
                            data_dir=config.data.data_dir or None, download=config.data.download)
  sub = features.subset_indices(eval_source.num_examples, e.num_samples, e.seed)
  real = eval_source.get(sub)['image']
  recon = batches(real, lambda x: decode(encode(x)))
  recon_u8 = metrics.quantize_uint8(recon)
  rmse = float(np.sqrt(np.mean((recon_u8.astype(np.float64) - real) ** 2)) / 255.0)
  net, stats = sweep.feature_net_and_stats(config, os.path.join(workdir, 'eval'), train_source)
  k = e.precision_recall_k
  got = sweep.score(recon, net, stats['reference'], k=k)
  floor = sweep.floor_metrics(stats['floor'], stats['reference'], k=k)
  out = {'latent_mean': shift, 'latent_std': std, 'scale_images': int(idx.size),
         'recon_rmse': rmse, 'recon_rmse_units': 'uint8 pixels / 255',
         'recon_fid': float(got['fid']), 'real_fid': float(floor['fid']),
         'recon_precision': float(got['precision']), 'recon_recall': float(got['recall']),
         'fid_images': int(real.shape[0]), 'fid_split': config.data.eval_split,
         'feature_net': net.info.get('description', net.kind)}
  log(f'autoencoder: reconstruction of {real.shape[0]} {config.data.eval_split} images: RMSE '
      f'{rmse:.4f} (a fraction of the pixel range), FID {out["recon_fid"]:.3f} against the real images\' '
      f'{out["real_fid"]:.3f}')
  return out


def train_autoencoder(config, workdir: str, output: str = '') -> str:
  """Trains (or resumes, or loads) the autoencoder; writes and returns its codec file."""
  import jax  # pylint: disable=g-import-not-at-top
  from gdistill import codec as codec_lib  # pylint: disable=g-import-not-at-top
  from gdistill import console, sharding, storage, teacher_file, workdir_lock, xla_options  # pylint: disable=g-import-not-at-top
  from gdistill.data import num_workers, open_source  # pylint: disable=g-import-not-at-top
  from gdistill.loop import LoopContext, Phase, run_phase  # pylint: disable=g-import-not-at-top
  from gdistill.metric_writer import MetricWriter, RunProgress, log  # pylint: disable=g-import-not-at-top
  from gdistill.models.autoencoder import Autoencoder, latent_shape  # pylint: disable=g-import-not-at-top
  from gdistill.networks import param_count  # pylint: disable=g-import-not-at-top
  from gdistill.train_state import init_state, make_optimizer, make_update_fn  # pylint: disable=g-import-not-at-top
  from gdistill.workdir import check_config, record_config  # pylint: disable=g-import-not-at-top

  validate(config)
  workdir = storage.absolute(workdir)
  a = config.autoencoder
  mesh = sharding.make_mesh(config.mesh.to_dict())
  if a.batch_size % mesh.size:
    from gdistill.config_validation import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f'autoencoder.batch_size={a.batch_size}: expected a multiple of the '
                      f'number of devices ({mesh.size})')
  with console.output_to_log('tfds'):
    source = open_source(config.data.name, split=config.data.split,
                         data_dir=config.data.data_dir or None, download=config.data.download)
  arch = arch_of(a)
  if arch['out_ch'] != source.image_shape[-1]:
    from gdistill.config_validation import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f'autoencoder.out_ch={arch["out_ch"]}: expected the images\' '
                      f'{source.image_shape[-1]} channels')
  try:
    lshape = latent_shape(source.image_shape, ch_mult=arch['ch_mult'],
                          latent_ch=arch['latent_ch'])
  except ValueError as e:
    from gdistill.config_validation import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f'autoencoder.ch_mult={arch["ch_mult"]}: {e}') from e
  check_config(config, workdir)
  lock = workdir_lock.acquire(workdir, 'gdistill.autoencoder') if jax.process_index() == 0 else None
  writer = None
  try:
    record_config(config, workdir)
    console.open_log(workdir, jax.process_index())
    module = Autoencoder(**arch)
    options = xla_options.compile_options(config, mesh.devices.flat[0].platform)
    opt = make_optimizer(learning_rate=a.learning_rate, warmup_steps=a.warmup_steps,
                         total_steps=a.num_steps, decay=a.lr_decay, grad_clip=a.grad_clip)
    update = make_update_fn(functools.partial(loss_fn, module=module, kl_weight=a.kl_weight),
                            opt, ema_decay=a.ema_decay)
    image_shape = tuple(source.image_shape)

    def init_fn(frozen):
      import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
      del frozen
      x = jnp.zeros((1, *image_shape), jnp.float32)
      return init_state(module.init(jax.random.PRNGKey(config.seed), x)['params'], opt,
                        ema=a.ema_decay > 0)

    writer = MetricWriter(workdir)
    ctx = LoopContext(workdir=workdir, mesh=mesh, source=source, seed=config.seed,
                      strategy=config.sharding, writer=writer, log_every=config.log_every,
                      max_to_keep=config.checkpoint.max_to_keep,
                      keep_train_state=config.checkpoint.keep_train_state,
                      data_workers=num_workers(config.data.num_workers),
                      compile_options=options)
    ctx.run = RunProgress([(PHASE, PHASE, a.num_steps)], more_work=True)
    meta = {'phase': PHASE, 'autoencoder': codec_lib._json_arch(arch),  # pylint: disable=protected-access
            'image_shape': list(image_shape), 'latent_shape': list(lshape),
            'dataset': config.data.name, 'has_ema': a.ema_decay > 0}
    phase = Phase(name=PHASE, num_steps=a.num_steps, batch_size=a.batch_size, init_fn=init_fn,
                  update_fn=update, frozen={}, meta=meta, checkpoint_every=a.checkpoint_every)
    abstract = jax.eval_shape(init_fn, {}).params
    log(f'autoencoder: {param_count(abstract) / 1e6:.3f}M parameters, images '
        f'{list(image_shape)} -> latents {list(lshape)}')
    params = run_phase(phase, ctx)
    path = os.path.join(workdir, FILE)
    if storage.isfile(path) and storage.isfile(teacher_file.sidecar_path(path)):
      log(f'autoencoder: {path} exists (kept)')
    else:
      params = jax.device_get(params)
      raw = codec_lib.AutoencoderCodec(arch=arch, params=params, scale=1.0, shift=0.0,
                                       image_shape=image_shape)
      t0 = time.perf_counter()
      measured = measure(raw, config=config, workdir=workdir, train_source=source, log=log)
      final = codec_lib.AutoencoderCodec(
          arch=arch, params=params, scale=1.0 / measured['latent_std'],
          shift=measured['latent_mean'], image_shape=image_shape)
      codec_lib.save(path, final, measured=measured, extra_info={
          'dataset': config.data.name, 'steps': int(a.num_steps),
          'images_seen': int(a.num_steps * a.batch_size), 'kl_weight': float(a.kl_weight),
          'made_by': 'python -m gdistill.autoencoder', 'config': config.to_dict()})
      log(f'autoencoder: measured in {time.perf_counter() - t0:.0f}s; wrote {path}')
    if output and jax.process_index() == 0:
      for src, dst in ((path, output), (teacher_file.sidecar_path(path),
                                        teacher_file.sidecar_path(output))):
        storage.makedirs(os.path.dirname(storage.absolute(dst)))
        shutil.copyfile(src, dst)
      log(f'autoencoder: copied to {output}')
    log(f'done: {workdir}')
    return path
  finally:
    if writer is not None:
      writer.close()
    if lock is not None:
      workdir_lock.release(lock)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from gdistill import console  # pylint: disable=g-import-not-at-top
  console.setup(hold=True)
  config = _cli.config_value(_CONFIG)
  if config is None or not _WORKDIR.value:
    _cli.fail('--config and --workdir are required, e.g. '
              '--config=configs/fashion_mnist_autoencoder.py --workdir=runs/autoencoder')
  if _OUTPUT.value and not _OUTPUT.value.endswith('.msgpack'):
    _cli.fail(f'--output={_OUTPUT.value}: expected a file name ending in .msgpack (its JSON '
              f'sidecar is written beside it)')
  with _cli.user_errors():
    train_autoencoder(config, _WORKDIR.value, _OUTPUT.value or '')


if __name__ == '__main__':
  app.run(main, flags_parser=_cli.parse_flags)
