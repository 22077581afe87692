"""What the benchmarks share: config loading, the networks and step functions
built from gdistill's own pieces, timing, the measured machine peak, records.

Import this module before anything imports JAX (it imports
``gdistill.cli_setup``, which sets the CPU device count, and a benchmark script re-runs
itself with the malloc a gdistill command runs with).

The benchmarks feed random batches of the dataset's shape: step and sampler
speed does not depend on pixel values, and no dataset (nor TensorFlow
Datasets) is needed, so they run unchanged on a bare accelerator machine.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import importlib.util
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from gdistill import cli_setup  # pylint: disable=g-import-not-at-top  # before jax

# A benchmark script measures what a gdistill command runs with: glibc's huge-page malloc
# (cli_setup.malloc_env; GDISTILL_MALLOC=0 measures glibc's defaults). Not when imported
# by another program (a test).
if os.path.dirname(os.path.abspath(getattr(sys.modules['__main__'], '__file__', None) or '')) \
    == os.path.dirname(os.path.abspath(__file__)):
  cli_setup.rerun_with_fast_malloc()

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from gdistill import model_store, networks, phases, run_plan, run_setup, sharding, xla_options  # pylint: disable=g-import-not-at-top
from gdistill import codec as codec_lib  # pylint: disable=g-import-not-at-top
from gdistill.models import registry  # pylint: disable=g-import-not-at-top

DEFAULT_CONFIG = os.path.join(REPO, 'configs', 'fashion_mnist.py')
QUICK_CONFIG = os.path.join(REPO, 'configs', 'smoke.py')

# (H, W, C) and classes of the datasets the configs name; the benchmarks feed
# random data of that shape rather than open the dataset.
DATASETS = {
    'fashion_mnist': ((28, 28, 1), 10),
    'fashion_mnist_local': ((28, 28, 1), 10),
    'mnist': ((28, 28, 1), 10),
    'cifar10': ((32, 32, 3), 10),
    'imagenet_resized/64x64': ((64, 64, 3), 1000),
}


# ---- command line and config ----------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description)
  p.add_argument('--config', default=None,
                 help=f'config file (default {os.path.relpath(DEFAULT_CONFIG, REPO)}; '
                      f'--quick: {os.path.relpath(QUICK_CONFIG, REPO)})')
  p.add_argument('--quick', action='store_true',
                 help='the smoke-sized model (configs/smoke.py) and fewer repetitions')
  p.add_argument('--json', default=None, help='also write the records to this JSON file')
  p.add_argument('--precision', default=None, choices=('float32', 'bfloat16'),
                 help='override config.precision')
  p.add_argument('--sharding', default=None, choices=sharding.STRATEGIES,
                 help='override config.sharding')
  p.add_argument('--batch', type=int, default=None,
                 help='training batch (default: the config\'s teacher.batch_size)')
  p.add_argument('--xla-defaults', action='store_true',
                 help='config.cpu_xla_tuned=False: compile with XLA\'s default options on CPU')
  return p


def load_config(path: Optional[str], *, quick: bool):
  path = path or (QUICK_CONFIG if quick else DEFAULT_CONFIG)
  arg = None
  if ':' in os.path.basename(path):
    path, arg = path.rsplit(':', 1)
  spec = importlib.util.spec_from_file_location('benchmark_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config() if arg is None else module.get_config(arg)
  return config, os.path.relpath(os.path.abspath(path), REPO)


@dataclasses.dataclass
class Setup:
  """A config turned into what the benchmarks run: mesh, shapes, networks."""
  config: Any
  config_name: str
  quick: bool
  mesh: jax.sharding.Mesh
  image_shape: tuple
  num_classes: int
  batch: int
  teacher_net: Any
  student_net: Any
  compile_options: dict
  params_cache: dict = dataclasses.field(default_factory=dict)
  codec: Any = codec_lib.IDENTITY  # a latent config's autoencoder (config.codec.path)

  @property
  def data_shape(self) -> tuple:
    """The images' shape (``image_shape`` is the networks', the latents' in a latent run)."""
    return self.image_shape if self.codec.is_identity else tuple(self.codec.image_shape)

  @property
  def dtype(self):
    return networks.COMPUTE_DTYPES[self.config.precision]

  def describe(self) -> str:
    c = self.config
    dev = jax.devices()[0]
    return (f'config {self.config_name} | {describe_model(c.model)} | image {self.image_shape} | '
            f'{c.precision} | {c.sharding} over {self.mesh.size} x {dev.platform} '
            f'({dev.device_kind}) | {jax.process_count()} process(es), jax {jax.__version__} | '
            f'XLA options {self.compile_options or "default"}')


def describe_model(model) -> str:
  """The network of a config's model section in a few words."""
  m = model.to_dict()
  if registry.arch_name(m) == 'unet':
    return (f'model {m["size"]} ch={m["ch"]} mult={tuple(m["ch_mult"])} '
            f'blocks={m["num_res_blocks"]} attn={tuple(m["attn_resolutions"])}')
  shown = {k: v for k, v in m.items() if k not in ('arch', 'size')}
  return f'model {m["arch"]} {m["size"]} ' + ' '.join(f'{k}={v}' for k, v in shown.items())


def with_model(setup: Setup, model, name_suffix: str = '') -> Setup:
  """The setup with ``config.model`` replaced by ``model`` (a model section, e.g.
  ``config_base.dit_model(...)``), its networks rebuilt."""
  config = copy.deepcopy(setup.config)
  config.model = model
  mk = functools.partial(networks.make_net, config, num_classes=setup.num_classes,
                         out_ch=setup.image_shape[-1])
  return dataclasses.replace(setup, config=config, config_name=setup.config_name + name_suffix,
                             teacher_net=mk(use_w=False), student_net=mk(use_w=True),
                             params_cache={})


def make_setup(args) -> Setup:
  config, name = load_config(args.config, quick=args.quick)
  if args.precision:
    config.precision = args.precision
  if args.sharding:
    config.sharding = args.sharding
  if args.xla_defaults:
    config.cpu_xla_tuned = False
  if config.data.name not in DATASETS:
    raise SystemExit(f'data.name={config.data.name!r}: the benchmarks know {sorted(DATASETS)}')
  data_shape, num_classes = DATASETS[config.data.name]
  codec = run_setup.open_codec(config, tuple(data_shape))
  image_shape = codec.model_shape(tuple(data_shape))
  mesh = sharding.make_mesh(config.mesh.to_dict())
  batch = args.batch or config.teacher.batch_size
  if batch % mesh.size:
    raise SystemExit(f'batch {batch} does not split over {mesh.size} devices: pass --batch')
  mk = functools.partial(networks.make_net, config, num_classes=num_classes,
                         out_ch=image_shape[-1])
  return Setup(config=config, config_name=name, quick=args.quick, mesh=mesh,
               image_shape=tuple(image_shape), num_classes=num_classes, batch=batch,
               teacher_net=mk(use_w=False), student_net=mk(use_w=True),
               compile_options=xla_options.compile_options(config, mesh.devices.flat[0].platform),
               codec=codec)


def script_main(description: str, run, steps: Optional[tuple] = None,
                steps_help: str = '') -> None:
  """The command line of a benchmark: the common flags (and ``--steps``, a
  comma-separated subset of ``steps``, when given); ``run(setup, records)`` (with
  ``which=`` the chosen steps), then the records to ``--json`` if given."""
  p = parser(description)
  if steps:
    p.add_argument('--steps', default=','.join(steps),
                   help=f'comma-separated subset of {",".join(steps)}{steps_help}')
  args = p.parse_args()
  records = Records()
  which = {'which': tuple(args.steps.split(','))} if steps else {}
  run(make_setup(args), records, **which)
  if args.json:
    records.write(args.json)


# ---- records and tables -------------------------------------------------------------


class Records:
  """The JSON list of {"name", "value", "unit"} that run.py writes."""

  def __init__(self):
    self.items = []

  def add(self, name: str, value, unit: str):
    self.items.append({'name': name, 'value': float(value), 'unit': unit})

  def write(self, path: str):
    with open(path, 'w') as f:
      json.dump(self.items, f, indent=1)
    print(f'wrote {len(self.items)} records to {path}')


def table(title: str, header, rows) -> str:
  """A plain-text table; floats to 4 significant digits."""
  fmt = lambda v: f'{v:.4g}' if isinstance(v, float) else str(v)
  cells = [list(map(str, header))] + [[fmt(v) for v in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  line = lambda r: '  '.join(c.rjust(w) for c, w in zip(r, widths))
  out = [f'\n{title}', line(cells[0]), '  '.join('-' * w for w in widths)]
  out += [line(r) for r in cells[1:]]
  text = '\n'.join(out)
  print(text, flush=True)
  return text


# ---- timing ---------------------------------------------------------------------------


def block(x):
  return jax.block_until_ready(x)


def interleaved_times(fns: dict, *, rounds: int, min_seconds: float = 0.0,
                      min_call_seconds: float = 0.0) -> dict:
  """Median wall time of one call of each no-argument callable, timed in rounds.

  Round r times every function in turn, so load from other processes falls on
  all of them alike and their ratios stay meaningful under contention. A
  function faster than ``min_call_seconds`` (judged on one calibration call)
  is called that many times over within each timing, and the time divided,
  which keeps timer noise out of short calls. Rounds go on past
  ``rounds`` until ``min_seconds`` have passed (at most 4 x ``rounds``).
  """
  repeats = {}
  for k, fn in fns.items():
    t0 = time.perf_counter()
    block(fn())
    once = time.perf_counter() - t0
    repeats[k] = max(1, int(min_call_seconds / max(once, 1e-6) + 0.999))
  times = {k: [] for k in fns}
  t_start, r = time.perf_counter(), 0
  while r < rounds or (time.perf_counter() - t_start < min_seconds and r < 4 * rounds):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(repeats[k]):
        block(fn())  # bounded dispatch: queuing hundreds of calls can hang 2 CPU devices
      times[k].append((time.perf_counter() - t0) / repeats[k])
    r += 1
  return {k: statistics.median(v) for k, v in times.items()}


def timed_compile(jitted, *args, options=None):
  """AOT lower + compile with XLA ``options`` (``Setup.compile_options``, as
  the driver compiles); returns (compiled, seconds, lowered)."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  compiled = xla_options.compile(lowered, options)
  return compiled, time.perf_counter() - t0, lowered


def cost_flops(stage) -> float:
  """XLA's flop count of a lowered or compiled computation.

  Use the *lowered* one for model FLOPs: it is the whole (global) program
  before optimisation, counted the same on every backend. A compiled GPU
  program hides its convolutions in cuDNN custom calls that the count
  misses (ImageNet 64 on an H100/H200 read ~7x low), and a compiled sharded
  program is counted per device.
  """
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per module
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', float('nan')))


def memory_bytes(compiled) -> dict:
  """Per-device sizes from XLA's memory analysis (what the step needs at most)."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  get = lambda k: float(getattr(m, k, 0) or 0)
  out = {k: get(f'{k}_size_in_bytes') for k in ('argument', 'output', 'alias', 'temp')}
  out['peak_estimate'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


def device_peak_bytes() -> Optional[float]:
  """Peak bytes in use on device 0 since start (None where not reported, e.g. CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  return float(stats.get('peak_bytes_in_use', stats.get('bytes_in_use', float('nan'))))


def max_rss_bytes() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # KiB on Linux


# ---- machine peak ----------------------------------------------------------------------


class MatmulPeak:
  """A large jitted matmul in ``dtype``, on one device and on all, as timed callables.

  On all devices the matmuls are a batch split over the mesh's data axis
  (each device multiplies its own pair), the way a data-parallel step loads
  the machine. Each is compiled with XLA's defaults and, where given, with
  the XLA ``options`` the timed work uses (on CPU those run the matmul in XLA's
  own runtime, ~10% faster than YNNPACK's); the machine's peak is the fastest
  of them. Time ``fns()`` in the same ``interleaved_times`` call as the work
  it is the peak for: the speed of a shared machine drifts by tens of
  percent within minutes, and a peak measured before the work would put that
  drift into the fraction.
  """

  def __init__(self, mesh, dtype, *, size: Optional[int] = None, options=None):
    platform = jax.devices()[0].platform
    self.size = size or (2048 if platform == 'cpu' else 8192)
    self.n = mesh.size
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (self.n, self.size, self.size), dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (self.n, self.size, self.size), dtype)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.DATA_AXIS))
    args = {'all_devices': jax.device_put((a, b), spec),
            'one_device': jax.device_put((a[0], b[0]), jax.devices()[0])}
    jitted = {'all_devices': jax.jit(lambda x, y: jnp.einsum('bij,bjk->bik', x, y),
                                     out_shardings=spec),
              'one_device': jax.jit(lambda x, y: x @ y)}
    self._fns = {}
    for where, fn in jitted.items():
      for tag, opts in (('', None), ('_tuned', options)):
        if tag and not opts:
          continue
        compiled = xla_options.compile(fn.lower(*args[where]), opts)
        block(compiled(*args[where]))
        self._fns[f'matmul_{where}{tag}'] = functools.partial(compiled, *args[where])

  def fns(self) -> dict:
    return dict(self._fns)

  def result(self, times: dict) -> dict:
    """The FLOP/s from ``interleaved_times`` results that include ``fns()``."""
    flops = 2.0 * self.size ** 3
    rate = {k: (self.n if 'all_devices' in k else 1) * flops / times[k] for k in self._fns}
    one = max(v for k, v in rate.items() if 'one_device' in k)
    all_ = max(v for k, v in rate.items() if 'all_devices' in k)
    return {'size': self.size, 'one_device': one, 'all_devices': all_, 'peak': max(one, all_)}


# ---- state, batches and step functions (as gdistill.train builds them) -----------------


def random_batch(setup: Setup, batch: int, seed: int = 0):
  """A random batch of images in [-1, 1] and labels, split over the mesh."""
  rng = np.random.default_rng(seed)
  image = rng.uniform(-1, 1, (batch, *setup.data_shape)).astype(np.float32)
  label = rng.integers(0, setup.num_classes, (batch,)).astype(np.int32)
  sh = sharding.batch_sharding(setup.mesh)
  return {'image': jax.device_put(image, sh), 'label': jax.device_put(label, sh)}


@dataclasses.dataclass
class StepFn:
  """One phase's update function with its (sharded) state and frozen inputs."""
  name: str
  update_fn: Callable
  init_fn: Callable  # init_fn(frozen) -> TrainState
  frozen: Any

  def build_state(self, mesh, strategy):
    """Born sharded, as loop.init_state does."""
    abstract = jax.eval_shape(self.init_fn, self.frozen)
    shardings = sharding.state_shardings(abstract, mesh, strategy)
    return jax.jit(self.init_fn, out_shardings=shardings)(self.frozen)

  def compile(self, mesh, state, batch, rng, options=None):
    """AOT, with the shardings and donation of loop.compile_step:
    (compiled, seconds, lowered)."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    repl = sharding.replicated(mesh)
    frozen_sh = jax.tree.map(lambda x: x.sharding if isinstance(x, jax.Array) else repl,
                             self.frozen)
    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
    jitted = jax.jit(self.update_fn, in_shardings=(state_sh, frozen_sh, batch_sh, repl),
                     out_shardings=(state_sh, repl), donate_argnums=(0,))
    return timed_compile(jitted, state, self.frozen, batch, rng, options=options)


def _init_fn(setup: Setup, net):
  return functools.partial(networks.init_params, net, image_shape=setup.image_shape)


def abstract_params(setup: Setup, net, seed: int):
  """The shapes and dtypes of ``net``'s parameters (nothing is created)."""
  return jax.eval_shape(_init_fn(setup, net), jax.random.PRNGKey(seed))


def _random_params(setup: Setup, net, seed: int):
  """Sharded random parameters of ``net``, made once per setup (the init's
  compile is seconds, and several benchmarks of one run ask for them)."""
  key = (id(net), seed)
  if key not in setup.params_cache:
    sh = sharding.state_shardings(abstract_params(setup, net, seed), setup.mesh,
                                  setup.config.sharding)
    setup.params_cache[key] = jax.jit(_init_fn(setup, net), out_shardings=sh)(
        jax.random.PRNGKey(seed))
  return setup.params_cache[key]


def teacher_params(setup: Setup, seed: int = 0):
  """Sharded random teacher parameters (frozen input of stage 1)."""
  return _random_params(setup, setup.teacher_net, seed)


def student_params(setup: Setup, seed: int = 1):
  """Sharded random parameters of the w-conditioned student."""
  return _random_params(setup, setup.student_net, seed)


def _builder(setup: Setup) -> phases.PhaseBuilder:
  """The driver's phase builder over the setup's mesh (its store never loads anything)."""
  if 'builder' not in setup.params_cache:
    store = model_store.ModelStore('benchmark', setup.config, mesh=setup.mesh,
                                   image_shape=setup.image_shape, num_classes=setup.num_classes,
                                   strategy=setup.config.sharding,
                                   compile_options=setup.compile_options, codec=setup.codec)
    setup.params_cache['builder'] = phases.PhaseBuilder(setup.config, store)
  return setup.params_cache['builder']


def _step(setup: Setup, spec: run_plan.PhaseSpec, teacher_p=None) -> StepFn:
  phase = _builder(setup).build(spec, teacher_p)
  return StepFn(spec.kind, phase.update_fn, phase.init_fn, phase.frozen)


def teacher_step(setup: Setup) -> StepFn:
  """The teacher phase's step, as the driver builds it (gdistill.phases)."""
  return _step(setup, run_plan.PhaseSpec('teacher', run_plan.TEACHER, None, None, 'teacher'))


def stage1_step(setup: Setup, teacher_p) -> StepFn:
  """The stage-1 step: the student matches the guided teacher."""
  return _step(setup, run_plan.PhaseSpec('stage1', run_plan.STAGE1, None, 'teacher', 'stage1'),
               teacher_p)


def stage2_step(setup: Setup, student_p, student_steps: int = 8) -> StepFn:
  """A stage-2 halving's step: one student step matches two teacher steps."""
  spec = run_plan.PhaseSpec(run_plan.phase_name(run_plan.STAGE2, student_steps), run_plan.STAGE2,
                            student_steps, 'stage1', 'stage2')
  return _step(setup, spec, student_p)
