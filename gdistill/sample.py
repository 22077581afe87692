"""Command line: samples from any model in a workdir.

  python -m gdistill.sample --workdir=runs/fashion_mnist --steps=4 --w=1 --class=sneaker \\
      --num=16 --sampler=ddim --seed=0 --output=sneakers.png

``--model`` picks the network:
  * a one-file model (``*.msgpack`` with its JSON sidecar, e.g. the shipped teacher
    ``gdistill/weights/fashion_mnist_teacher.msgpack``): no workdir needed, so right
    after ``pip install``:
      python -m gdistill.sample --model=gdistill/weights/fashion_mnist_teacher.msgpack \\
          --steps=64 --w=1 --class=sneaker --output=s.png
  * ``student`` (default): the stage-2 student that serves the sampler at the step
    count (``gdistill.run_plan``: ``--sampler=stochastic --steps=N`` uses the
    N/2-step student), one network evaluation per step.
    ``--method=consistency``: the consistency student instead (guided consistency
    distillation, ``--config.stages`` with ``consistency``), multistep consistency
    sampling at any step count, one network evaluation per step.
  * ``stage1``: the undistilled w-conditioned model, any step count, 1 per step.
  * ``teacher``: the guided teacher, any step count, 2 per step.
Without ``--class`` it draws ``--num`` samples of every class (a row each).
Output: .png grid or .npz (``image`` uint8 [n, H, W, C], ``label``, settings).
"""

from gdistill import cli_setup  # sets XLA_FLAGS before JAX starts; pylint: disable=unused-import

from absl import app, flags  # pylint: disable=g-import-not-at-top,g-bad-import-order

from gdistill import cli_setup as cli  # pylint: disable=g-import-not-at-top
from gdistill import console  # pylint: disable=g-import-not-at-top

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a run.')
_STEPS = flags.DEFINE_integer('steps', None, 'Sampling steps.')
_W = flags.DEFINE_float('w', 1.0, 'Guidance weight w >= 0 (0: the conditional model).')
_CLASS = flags.DEFINE_string('class', None, 'Class label or name; default: every class.')
_NUM = flags.DEFINE_integer('num', 8, 'Samples (per class without --class).')
_SAMPLER = flags.DEFINE_enum('sampler', 'ddim', ['ddim', 'stochastic'], 'Sampler.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the noise.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output file, .png or .npz.')
_MODEL = flags.DEFINE_string('model', 'student',
                             'student, stage1, teacher (of --workdir), or a one-file model '
                             '(*.msgpack with its .json sidecar; see the module docstring).')
PHASE_MODELS = ('student', 'stage1', 'teacher')
_METHOD = flags.DEFINE_enum('method', 'progressive', ['progressive', 'consistency'],
                            'The distillation method of --model=student: progressive '
                            '(the stage-2 student of the step count) or consistency.')
_BATCH = flags.DEFINE_integer('batch_size', 256, 'Samples per device batch.')


def model_phase(work, *, model: str, sampler: str, steps: int,
                method: str = 'progressive') -> str:
  """The checkpoint phase that serves (model, sampler, steps); CheckpointError if absent."""
  from gdistill.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  if model == 'student' and method == 'consistency':
    model = 'consistency'
  if model in ('stage1', 'teacher', 'consistency'):
    if model not in work.finished():
      raise CheckpointError(f'--model={model}: workdir {work.path} has no {model} checkpoint '
                            f'(it holds: {work.describe()})')
    return model
  phase = work.student_phase(sampler, steps)
  if phase is not None:
    return phase
  if sampler == 'ddim':
    raise CheckpointError(
        f'--steps={steps}: workdir {work.path} has no {steps}-step student; distilled step '
        f'counts for --sampler=ddim: {", ".join(map(str, work.student_steps())) or "none"} (or '
        f'use --model=stage1 or --model=teacher for any step count)')
  raise CheckpointError(
      f'--steps={steps}: the stochastic sampler at N steps needs the N/2-step student; this '
      f'workdir serves --sampler=stochastic at '
      f'{", ".join(map(str, work.stochastic_steps())) or "none"} steps (or use --model=stage1 '
      f'or --model=teacher for any step count)')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  console.setup()  # library lines below ERROR: off the terminal (this command keeps no log)
  from_file = _MODEL.value not in PHASE_MODELS
  if from_file and not _MODEL.value.endswith('.msgpack'):
    cli.fail(f'--model={_MODEL.value}: expected student, stage1, teacher or a one-file model '
             f'(*.msgpack with its .json sidecar)')
  for flag in ((_STEPS, _OUTPUT) if from_file else (_WORKDIR, _STEPS, _OUTPUT)):
    if flag.value is None:
      cli.fail(f'--{flag.name} is required, e.g. --workdir=runs/fashion_mnist --steps=4 '
               f'--output=samples.png')
  if _STEPS.value < 1:
    cli.fail(f'--steps={_STEPS.value}: expected a positive number of steps')
  if _NUM.value < 1:
    cli.fail(f'--num={_NUM.value}: expected a positive number of samples')
  if _W.value < 0:
    cli.fail(f'--w={_W.value}: expected a guidance weight >= 0')
  if _BATCH.value < 1:
    cli.fail(f'--batch_size={_BATCH.value}: expected a positive integer')
  from gdistill import image_io  # pylint: disable=g-import-not-at-top
  image_io.check_output_path(_OUTPUT.value, fail=cli.fail)
  with cli.user_errors():
    if from_file:
      sample(None)
      return
    from gdistill.model_store import load_config  # pylint: disable=g-import-not-at-top
    config = load_config(_WORKDIR.value)
    cli.maybe_initialize_distributed(config)
    sample(config)


def sample(config):
  """Draws the samples the flags ask for and writes them (process 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from gdistill import compiled_samplers, image_io  # pylint: disable=g-import-not-at-top
  from gdistill.metric_writer import log  # pylint: disable=g-import-not-at-top
  from gdistill.model_store import ModelStore  # pylint: disable=g-import-not-at-top

  if config is None:  # a one-file model
    work, model = ModelStore.open_file(_MODEL.value)
  else:
    work = ModelStore.open(_WORKDIR.value, config)
  if _CLASS.value is not None:
    try:
      classes = [work.parse_class(_CLASS.value, '--class')]
    except ValueError as e:
      cli.fail(str(e))
  else:
    classes = list(range(work.num_classes))
  steps, sampler = _STEPS.value, _SAMPLER.value
  if config is not None:
    model = work.load(model_phase(work, model=_MODEL.value, sampler=sampler, steps=steps,
                                  method=_METHOD.value))
  else:
    trained = model.meta.get('student_steps') if model.mode == 'student' else None
    serves = trained if sampler == 'ddim' else (2 * trained if trained else None)
    if serves is not None and steps != serves:
      cli.fail(f'--steps={steps}: {_MODEL.value} is the {trained}-step student, which serves '
               f'--sampler={sampler} at --steps={serves}')
  phase = model.phase
  if model.mode == 'consistency':  # its one sampler: multistep consistency sampling
    sampler = 'consistency'
  fn = work.sampler(model.mode, sampler)
  labels = np.repeat(np.asarray(classes, np.int32), _NUM.value)
  rng = jax.random.PRNGKey(_SEED.value)
  z_1 = np.asarray(jax.random.normal(jax.random.fold_in(rng, 0),
                                     (labels.shape[0], *work.image_shape)))

  def run(k, label, z):
    return fn(model.params, label, jnp.float32(_W.value), z, jnp.int32(steps),
              jax.random.fold_in(rng, 1 + k))
  images = compiled_samplers.run_batched(run, (labels, z_1), batch_size=_BATCH.value,
                                        mesh=work.mesh)
  nfe = steps * compiled_samplers.nfe_per_step(model.mode)
  if jax.process_index() == 0:
    image_io.write_samples(_OUTPUT.value, images, labels, rows=len(classes), meta={
        'steps': steps, 'w': _W.value, 'sampler': sampler, 'model': phase, 'seed': _SEED.value,
        'nfe_per_sample': nfe})
  log(f'sample: {labels.shape[0]} samples from {phase} ({sampler}, {steps} steps, w={_W.value:g},'
      f' {nfe} network evaluations each); wrote {_OUTPUT.value}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
