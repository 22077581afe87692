"""Command line: translates images of one class into another with a workdir's models.

  python -m gdistill.translate --workdir=runs/fashion_mnist --source_class=sneaker \\
      --target_class='ankle boot' --steps=8 --w=1 --input=shoes.png --output=boots.png

The maths, the routes and the pipeline stage are ``gdistill.translation``'s.
"""

from gdistill import cli_setup  # sets XLA_FLAGS before JAX starts; pylint: disable=unused-import


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None, 'Workdir of a finished run.')
  flags.DEFINE_string('source_class', None, 'Class of the input images (label or name).')
  flags.DEFINE_string('target_class', None, 'Class to translate to (label or name).')
  flags.DEFINE_integer('steps', None, 'Encoder and decoder steps.')
  flags.DEFINE_float('w', None, 'Guidance weight of the decoder (default: translate.w of the run).')
  flags.DEFINE_float('encode_w', None, 'Guidance weight of the encoder (default: the run\'s '
                     'translate.encode_w; a distilled encoder was trained at that value).')
  flags.DEFINE_enum('model', 'auto', ['auto', 'distilled', 'ddim', 'teacher'],
                    'distilled: encoder_nN + stage-2 student of N steps; ddim: the stage-1 model '
                    'both ways; teacher: the guided teacher both ways; auto: distilled where the '
                    'workdir has both, else ddim.')
  flags.DEFINE_string('input', None, 'Images: .npz (uint8 [n,H,W(,C)] or float in [-1,1] under '
                      '"image"/"images") or .png (one image, tiles, or a gdistill grid).')
  flags.DEFINE_string('output', None, 'Output .png (rows: input, translated) or .npz.')
  flags.DEFINE_integer('batch_size', 64, 'Images per device batch.')


def main(argv):
  import jax  # pylint: disable=g-import-not-at-top
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from gdistill import image_io  # pylint: disable=g-import-not-at-top
  from gdistill import cli_setup as cli  # pylint: disable=g-import-not-at-top
  from gdistill import console  # pylint: disable=g-import-not-at-top
  from gdistill import translation  # pylint: disable=g-import-not-at-top
  from gdistill.metric_writer import log  # pylint: disable=g-import-not-at-top
  from gdistill.model_store import ModelStore, load_config  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  console.setup()  # library lines below ERROR: off the terminal (this command keeps no log)
  for name in ('workdir', 'source_class', 'target_class', 'steps', 'input', 'output'):
    if f[name].value is None:
      cli.fail(f'--{name} is required, e.g. --workdir=runs/fashion_mnist --source_class=7 '
               f'--target_class=9 --steps=8 --input=shoes.png --output=boots.png')
  if f.steps < 1:
    cli.fail(f'--steps={f.steps}: expected a positive number of steps')
  if f.batch_size < 1:
    cli.fail(f'--batch_size={f.batch_size}: expected a positive integer')
  for flag in ('w', 'encode_w'):
    if f[flag].value is not None and f[flag].value < 0:
      cli.fail(f'--{flag}={f[flag].value}: expected a guidance weight >= 0')
  image_io.check_output_path(f.output, fail=cli.fail)
  with cli.user_errors():
    config = load_config(f.workdir)
    cli.maybe_initialize_distributed(config)
    work = ModelStore.open(f.workdir, config)
    try:
      source = work.parse_class(f.source_class, '--source_class')
      target = work.parse_class(f.target_class, '--target_class')
      x = image_io.read_images(f.input, work.image_shape, flag='--input')
    except ValueError as e:
      cli.fail(str(e))
    route = translation.choose_route(work, model=f.model, steps=f.steps)
    t = config.get('translate', {})
    encode_w = f.encode_w if f.encode_w is not None else float(t.get('encode_w', 0.0))
    w = f.w if f.w is not None else float(t.get('w', 1.0))
    translator = translation.Translator(work, encode_w=encode_w, w=w, batch_size=f.batch_size)
    y = translator(route, x, source, target)
    if jax.process_index() == 0:
      image_io.write_pairs(f.output, x, y, meta={
          'source': source, 'target': target, 'route': route.name, 'encoder': route.encoder,
          'decoder': route.decoder, 'steps': route.steps, 'w': w, 'encode_w': encode_w,
          'nfe_per_image': route.nfe})
      log(f'translate: {x.shape[0]} images {work.class_names[source]} -> '
          f'{work.class_names[target]} along {route.name} ({route.encoder} -> {route.decoder}, '
          f'{route.nfe} network evaluations each); wrote {f.output}')


if __name__ == '__main__':
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _define_flags()
  _app.run(main, flags_parser=cli_setup.parse_flags)
