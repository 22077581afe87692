"""Command line: translates images of one class into another with a workdir's models, or
with one-file models (no workdir: e.g. right after ``pip install``):

  python -m gdistill.translate --workdir=runs/fashion_mnist --source_class=sneaker \\
      --target_class='ankle boot' --steps=8 --w=1 --input=shoes.png --output=boots.png
  python -m gdistill.translate --model=gdistill/weights/fashion_mnist_student_4step.msgpack \\
      --encoder=gdistill/weights/fashion_mnist_teacher.msgpack --encode_steps=32 \\
      --source_class=sneaker --target_class='ankle boot' --steps=4 --input=s.png --output=b.png

With ``--model=FILE`` the file decodes at ``--steps``; the DDIM encoder is ``--encoder``
(a one-file teacher or stage-1 model; default: the decoder's file) at ``--encode_steps``
(default ``--steps``).

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
  flags.DEFINE_string('model', 'auto',
                      'distilled: encoder_nN + stage-2 student of N steps; ddim: the stage-1 model '
                      'both ways; teacher: the guided teacher both ways; auto: distilled where the '
                      'workdir has both, else ddim; or a one-file model (*.msgpack with its .json '
                      'sidecar) that decodes, without --workdir.')
  flags.DEFINE_string('encoder', None, 'With --model=FILE: the one-file model that DDIM-encodes '
                      '(default: the --model file).')
  flags.DEFINE_enum('method', 'progressive', ['progressive', 'consistency'],
                    'The distillation method that decodes (with --workdir): progressive (the '
                    'routes of --model) or consistency (the stage-1 model DDIM-encodes in '
                    'translate.encode_steps, the consistency student decodes in --steps).')
  flags.DEFINE_integer('encode_steps', None, 'With --model=FILE: the encoder\'s DDIM steps '
                       '(default: --steps).')
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
  from_file = f.model not in ROUTE_MODELS
  if from_file and not f.model.endswith('.msgpack'):
    cli.fail(f'--model={f.model}: expected {", ".join(ROUTE_MODELS)} or a one-file model '
             f'(*.msgpack with its .json sidecar)')
  if not from_file:
    for name in ('encoder', 'encode_steps'):
      if f[name].value is not None:
        cli.fail(f'--{name} needs --model=FILE (a one-file decoder); with --workdir the route '
                 f'picks the encoder')
  if from_file and f.workdir is not None:
    cli.fail(f'--model={f.model} and --workdir={f.workdir}: give one (a one-file model needs no '
             f'workdir)')
  required = ('source_class', 'target_class', 'steps', 'input', 'output')
  for name in required if from_file else ('workdir',) + required:
    if f[name].value is None:
      cli.fail(f'--{name} is required, e.g. --workdir=runs/fashion_mnist --source_class=7 '
               f'--target_class=9 --steps=8 --input=shoes.png --output=boots.png')
  for name in ('steps', 'encode_steps'):
    if f[name].value is not None and f[name].value < 1:
      cli.fail(f'--{name}={f[name].value}: expected a positive number of steps')
  if f.batch_size < 1:
    cli.fail(f'--batch_size={f.batch_size}: expected a positive integer')
  for flag in ('w', 'encode_w'):
    if f[flag].value is not None and f[flag].value < 0:
      cli.fail(f'--{flag}={f[flag].value}: expected a guidance weight >= 0')
  image_io.check_output_path(f.output, fail=cli.fail)
  with cli.user_errors():
    if from_file:
      config, work, route, models = _file_route(f)
    else:
      config = load_config(f.workdir)
      cli.maybe_initialize_distributed(config)
      work, models = ModelStore.open(f.workdir, config), None
    try:
      source = work.parse_class(f.source_class, '--source_class')
      target = work.parse_class(f.target_class, '--target_class')
      x = image_io.read_images(f.input, work.data_shape, flag='--input')
    except ValueError as e:
      cli.fail(str(e))
    t = config.get('translate', {})
    if not from_file and f.method == 'consistency':
      route = translation.consistency_route(
          work, f.steps, encode_steps=int(t.get('encode_steps', 0)) or f.steps)
    elif not from_file:
      route = translation.choose_route(work, model=f.model, steps=f.steps)
    encode_w = f.encode_w if f.encode_w is not None else float(t.get('encode_w', 0.0))
    w = f.w if f.w is not None else float(t.get('w', 1.0))
    translator = translation.Translator(work, encode_w=encode_w, w=w, batch_size=f.batch_size,
                                        models=models)
    y = translator(route, x, source, target)
    if jax.process_index() == 0:
      image_io.write_pairs(f.output, x, y, meta={
          'source': source, 'target': target, 'route': route.name, 'encoder': route.encoder,
          'decoder': route.decoder, 'steps': route.steps, 'encode_steps': route.encoder_steps,
          'w': w, 'encode_w': encode_w,
          'nfe_per_image': route.nfe})
      log(f'translate: {x.shape[0]} images {work.class_names[source]} -> '
          f'{work.class_names[target]} along {route.name} ({route.encoder} -> {route.decoder}, '
          f'{route.nfe} network evaluations each); wrote {f.output}')


ROUTE_MODELS = ('auto', 'distilled', 'ddim', 'teacher')


def _file_route(f):
  """(config, store, route, models) of ``--model=FILE`` (decoder) and ``--encoder``."""
  from gdistill import cli_setup as cli  # pylint: disable=g-import-not-at-top
  from gdistill import translation  # pylint: disable=g-import-not-at-top
  from gdistill.model_store import ModelStore  # pylint: disable=g-import-not-at-top
  work, dec = ModelStore.open_file(f.model)
  enc_path = f.encoder or f.model
  if enc_path == f.model:
    enc = dec
  else:
    if not enc_path.endswith('.msgpack'):
      cli.fail(f'--encoder={enc_path}: expected a one-file model (*.msgpack with its .json '
               f'sidecar)')
    enc_store, enc = ModelStore.open_file(enc_path)
    if ((tuple(enc_store.image_shape), enc_store.num_classes, enc_store.codec_meta())
        != (tuple(work.image_shape), work.num_classes, work.codec_meta())):
      cli.fail(f'--encoder={enc_path}: images {tuple(enc_store.image_shape)} of '
               f'{enc_store.num_classes} classes ({enc_store.codec.kind} codec), but '
               f'--model={f.model} makes {tuple(work.image_shape)} of {work.num_classes} '
               f'({work.codec.kind} codec)')
  name = lambda m: 'teacher' if m.mode == 'guided' else m.phase
  route = translation.Route(name=f'file{f.steps}', encoder=name(enc), decoder=name(dec),
                            steps=f.steps, clean_start=True, encode_steps=f.encode_steps)
  return work.config, work, route, {name(enc): enc, name(dec): dec}


if __name__ == '__main__':
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _define_flags()
  _app.run(main, flags_parser=cli_setup.parse_flags)
