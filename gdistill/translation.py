"""Image-to-image translation: DDIM-encode under class A, decode under class B.

``shared/METHOD.md`` section 6. An image x of class A is encoded to noise by
the deterministic DDIM run backwards (t from 0 to 1) under condition A, then
decoded by the deterministic sampler under condition B:

  z_1 = encode(x; A, encode_w),   x' = decode(z_1; B, w).

Two routes are compared: the undistilled stage-1 model both ways at many steps
("DDIM"), and the distilled encoder (``encoder_nXXXX``) with the stage-2 student
of the same step count ("distilled").

This module is the library: the maths, the routes (which trained models
translate), the quality scores and the pipeline stage. As a stage (``translate``
in ``config.stages``) it writes, for each pair in ``config.translate.pairs``,
``workdir/translate/<A>_to_<B>.png`` (rows: input, DDIM-translated,
distilled-translated per step count) and, when the evaluation classifier exists,
``workdir/translate/quality.json``. The command line is ``gdistill.translate``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from gdistill import compiled_samplers, consistency, guidance, methods, run_plan, samplers
from gdistill import storage
from gdistill.checkpoint import CheckpointError
from gdistill.config_validation import ConfigError
from gdistill.grids import save_grid
from gdistill.metric_writer import log
from gdistill.model_store import ModelStore

TRANSLATE_DIR = 'translate'
QUALITY_FILE = 'quality.json'


# ---- the pure maths ------------------------------------------------------------

def translate(encode_denoise, decode_denoise, x, *, encode_steps, decode_steps,
              clean_start=True, path=samplers.COSINE, clip: bool = True,
              decoder: str = 'ddim'):
  """x [B, H, W, C] in [-1, 1] -> translated x' (same shape).

  ``encode_denoise`` / ``decode_denoise`` are ``denoise_fn(z_t, t) -> x_hat`` under
  the source and target conditions (guidance inside them). Steps may be traced.
  ``clean_start``: see ``samplers.ddim_encode`` (False for a distilled encoder);
  ``path``: the noise path of both; ``clip``: whether the decoder clips x_hat.
  """
  z_1 = samplers.ddim_encode(encode_denoise, x, num_steps=encode_steps, clean_start=clean_start,
                             path=path)
  if decoder == 'consistency':  # a consistency student decodes (fixed re-noising noise)
    return samplers.consistency_sample(decode_denoise, z_1, num_steps=decode_steps,
                                       rng=jax.random.PRNGKey(0), clip=clip, path=path)
  return samplers.ddim_sample(decode_denoise, z_1, num_steps=decode_steps, clip=clip, path=path)


def denoise_fn_for(mode: str, net, *, params, label, w):
  """``guided``: the teacher (a ``Denoiser``) with classifier-free guidance at w (2 calls
  per step); ``student``: a w-conditioned network queried at w (1 call)."""
  if mode == 'guided':
    return guidance.guided_teacher_denoise_fn(net, params=params, cond=label, w=w)
  if mode == 'student':
    return guidance.conditional_denoise_fn(net, params=params, cond=label, w=w)
  if mode == 'consistency':  # the consistency function (decoders only)
    return consistency.consistency_fn(net, params=params, cond=label, w=w)
  raise ValueError(f'mode={mode!r}: expected guided, student or consistency')


def make_translate_fn(*, encode_net, decode_net, encode_mode: str, decode_mode: str,
                      codec=None):
  """Jitted ``fn(enc_params, dec_params, x, source [B], target [B], encode_w, w,
  encode_steps, decode_steps, clean_start) -> x'``; every argument after the
  parameters is traced, so step counts and classes share one compilation.

  ``codec``: a ``gdistill.codec`` that is not the identity: ``fn`` takes its parameters
  last, encodes the images x, translates their latents and decodes (clipped to [-1, 1])."""
  def fn(enc_params, dec_params, x, source, target, encode_w, w, encode_steps, decode_steps,
         clean_start):
    enc = denoise_fn_for(encode_mode, encode_net, params=enc_params, label=source, w=encode_w)
    dec = denoise_fn_for(decode_mode, decode_net, params=dec_params, label=target, w=w)
    return translate(enc, dec, x, encode_steps=encode_steps, decode_steps=decode_steps,
                     clean_start=clean_start, path=decode_net.path,
                     clip=decode_net.sampler_clips(decode_mode),
                     decoder='consistency' if decode_mode == 'consistency' else 'ddim')
  if codec is None:
    return jax.jit(fn)

  @jax.jit
  def through_codec(enc_params, dec_params, x, *args):
    *rest, codec_params = args
    z = fn(enc_params, dec_params, codec.encode_with(codec_params, x), *rest)
    return jnp.clip(codec.decode_with(codec_params, z), -1.0, 1.0)
  return through_codec


# ---- routes: which trained models translate ----------------------------------------

@dataclasses.dataclass(frozen=True)
class Route:
  """Encoder and decoder phases of one way to translate, at ``steps`` steps each."""
  name: str
  encoder: str
  decoder: str
  steps: int
  clean_start: bool  # the encoder is a DDIM encoder (not a distilled one)
  encode_steps: Optional[int] = None  # the encoder's steps where they differ from ``steps``

  @property
  def encoder_steps(self) -> int:
    return self.steps if self.encode_steps is None else self.encode_steps

  @property
  def nfe(self) -> int:
    """Network evaluations per translated image (a guided teacher step costs 2)."""
    per_step = lambda phase: methods.method(run_plan.parse_phase_name(phase)[0]).nfe_per_step
    n = self.encoder_steps
    enc = per_step(self.encoder) * (n - 1 if self.clean_start else n)
    return enc + per_step(self.decoder) * self.steps


def ddim_route(steps: int, model: str = 'stage1') -> Route:
  return Route(name=f'ddim{steps}', encoder=model, decoder=model, steps=steps, clean_start=True)


def distilled_route(work: ModelStore, steps: int, *, flag: str = 'translate.distilled_steps',
                    require_encoder: bool = False, encode_steps: int = 0) -> Route:
  """The distilled encoder and decoder of ``steps``; without a distilled encoder
  (``translate.distill_encoder=False``) the stage-1 model encodes with DDIM in
  ``encode_steps`` steps (0: in ``steps``)."""
  decoder = work.student_phase('ddim', steps)
  if decoder is None:
    raise CheckpointError(f'{flag}={steps}: workdir {work.path} has no {steps}-step student (it '
                          f'holds: {work.describe()})')
  enc = work.encoder_phase(steps)
  if enc is None:
    if require_encoder:
      raise CheckpointError(f'{flag}={steps}: workdir {work.path} has no {steps}-step distilled '
                            f'encoder (it holds: {work.describe()})')
    n = encode_steps or steps
    log(f'translate: no distilled {steps}-step encoder, the stage-1 model encodes instead '
        f'({n} DDIM steps)')
    return Route(name=f'distilled{steps}', encoder='stage1', decoder=decoder, steps=steps,
                 clean_start=True, encode_steps=encode_steps or None)
  return Route(name=f'distilled{steps}', encoder=enc, decoder=decoder, steps=steps,
               clean_start=False)


class Translator:
  """Loads the models of a workdir once and translates batches along routes.

  ``models``: models already loaded, by the names routes use (one-file models)."""

  def __init__(self, work: ModelStore, *, encode_w: float, w: float, batch_size: int = 64,
               models: Optional[dict] = None):
    self.work, self.encode_w, self.w, self.batch_size = work, encode_w, w, batch_size
    self._models, self._fns = dict(models or {}), {}

  def model(self, phase: str):
    if phase not in self._models:
      self._models[phase] = self.work.load(phase, purpose='translate')
    return self._models[phase]

  def __call__(self, route: Route, x: np.ndarray, source: int, target: int) -> np.ndarray:
    """x [n, H, W, C] in [-1, 1] -> [n, H, W, C] translated along ``route``."""
    enc, dec = self.model(route.encoder), self.model(route.decoder)
    key = (enc.mode, dec.mode)
    codec = self.work.codec
    if key not in self._fns:
      self._fns[key] = compiled_samplers.AotSampler(make_translate_fn(
          encode_net=enc.net, decode_net=dec.net, encode_mode=enc.mode,
          decode_mode=dec.mode, codec=None if codec.is_identity else codec), name='translate',
          compile_options=self.work.compile_options)
    fn = self._fns[key]
    n = x.shape[0]
    labels = (np.full((n,), source, np.int32), np.full((n,), target, np.int32))
    codec_args = () if codec.is_identity else (self.work.codec_params(),)

    def run(_, xs, src, tgt):
      return fn(enc.params, dec.params, xs, src, tgt, jnp.float32(self.encode_w),
                jnp.float32(self.w), jnp.int32(route.encoder_steps), jnp.int32(route.steps),
                jnp.bool_(route.clean_start), *codec_args)
    return compiled_samplers.run_batched(run, (np.asarray(x, np.float32), *labels),
                                         batch_size=self.batch_size, mesh=self.work.mesh)


def consistency_route(work: ModelStore, steps: int, *, encode_steps: int) -> Route:
  """The stage-1 model DDIM-encodes in ``encode_steps``, the consistency student decodes
  in ``steps`` (multistep consistency sampling from the encoded noise)."""
  if run_plan.CONSISTENCY not in work.finished():
    raise CheckpointError(f'--method=consistency: workdir {work.path} has no consistency '
                          f'student (it holds: {work.describe()})')
  return Route(name=f'consistency{steps}', encoder=run_plan.STAGE1,
               decoder=run_plan.CONSISTENCY, steps=steps, clean_start=True,
               encode_steps=encode_steps)


def choose_route(work: ModelStore, *, model: str, steps: int) -> Route:
  if model == 'ddim':
    return ddim_route(steps)
  if model == 'teacher':
    return ddim_route(steps, 'teacher')
  if model == 'distilled':
    return distilled_route(work, steps, flag='--steps', require_encoder=True)
  if steps in work.student_steps() and steps in work.encoder_steps():
    return distilled_route(work, steps, flag='--steps', require_encoder=True)
  log(f'translate: {steps}-step DDIM with the stage-1 model (distilled encoder+decoder pairs: '
      f'{sorted(set(work.student_steps()) & set(work.encoder_steps())) or "none"})')
  return ddim_route(steps)


# ---- the pipeline stage ------------------------------------------------------------

def _slug(name: str) -> str:
  return re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')


def pair_file(work: ModelStore, source: int, target: int) -> str:
  names = work.class_names
  return f'{source}-{_slug(names[source])}_to_{target}-{_slug(names[target])}.png'


def class_images(source, label: int, count: int) -> np.ndarray:
  """The first ``count`` images of class ``label`` in a data split, [count, H, W, C] in [-1, 1]."""
  labels = source.get(np.arange(source.num_examples))['label']
  idx = np.flatnonzero(labels == label)[:count]
  if idx.size < count:
    raise ConfigError(f'translate: split {source.split} has {idx.size} images of class {label}, '
                      f'{count} needed')
  return source.get(idx)['image'].astype(np.float32) / 127.5 - 1.0


def classifier_path(config, workdir: str) -> str:
  """Where the eval stage keeps its feature classifier (``gdistill.eval.features``)."""
  e = config.get('eval')
  custom = e.get('classifier_path', '') if e is not None else ''
  if custom:
    from gdistill.model_store import resolve_path  # pylint: disable=g-import-not-at-top
    return resolve_path(custom)
  return os.path.join(workdir, 'eval', 'classifier.npz')


def saved_classifier(config, workdir: str):
  """The eval stage's classifier of this dataset as ``classify(uint8) -> (features, logits)``,
  or None where it has not saved one."""
  from gdistill.eval import classifier as classifier_lib  # pylint: disable=g-import-not-at-top
  path = classifier_path(config, workdir)
  if not storage.isfile(path):
    return None
  params, meta = classifier_lib.load_classifier(path)
  if meta.get('dataset') != config.data.name:
    return None
  return classifier_lib.ClassifierFeatures(params, num_classes=meta['num_classes'])


def quality(classify, x_in: np.ndarray, x_out: np.ndarray, *, target: int, source: int) -> dict:
  """How often x_out is classified as ``target`` and how far it moved from x_in.

  ``classify(uint8 [n, H, W, C]) -> (features [n, d], logits [n, K])``.
  pixel_rmse: root mean square pixel difference in [0, 1] units; feature_l2: mean
  Euclidean distance of the classifier's features.
  """
  from gdistill.eval.metrics import quantize_uint8  # pylint: disable=g-import-not-at-top
  u_in, u_out = quantize_uint8(x_in), quantize_uint8(x_out)
  f_in, _ = classify(u_in)
  f_out, logits = classify(u_out)
  pred = np.argmax(logits, -1)
  diff = (u_out.astype(np.float64) - u_in.astype(np.float64)) / 255.0
  return {'target_rate': float(np.mean(pred == target)),
          'source_rate': float(np.mean(pred == source)),
          'pixel_rmse': float(np.sqrt(np.mean(diff**2))),
          'feature_l2': float(np.mean(np.linalg.norm(f_out - f_in, axis=-1))),
          'num_images': int(x_in.shape[0])}


def stage_routes(config, work: ModelStore) -> list[Route]:
  t = config.translate
  return [ddim_route(t.ddim_steps)] + [
      distilled_route(work, n, require_encoder=t.distill_encoder,
                      encode_steps=t.get('encode_steps', 0)) for n in t.distilled_steps]


def quality_report(config, work: ModelStore, translator: Translator, routes, eval_source,
                   classify) -> dict:
  """Per pair and route: target_rate, source_rate, pixel_rmse, feature_l2, nfe; plus
  the same numbers for the untranslated inputs as a reference."""
  t = config.translate
  equal_steps = [ddim_route(n) for n in t.distilled_steps if n != t.ddim_steps]
  report = {'encode_w': float(t.encode_w), 'w': float(t.w), 'pairs': []}
  for source, target in t.pairs:
    x = class_images(eval_source, source, t.quality_per_pair)
    entry = {'source': source, 'target': target,
             'source_name': work.class_names[source], 'target_name': work.class_names[target],
             'input': quality(classify, x, x, target=target, source=source), 'routes': {}}
    for route in list(routes) + equal_steps:
      r = quality(classify, x, translator(route, x, source, target), target=target,
                  source=source)
      r.update(nfe=route.nfe, encoder=route.encoder, decoder=route.decoder,
               steps=route.steps)
      entry['routes'][route.name] = r
      log(f'translate quality {work.class_names[source]} -> {work.class_names[target]} '
          f'{route.name}: target_rate={r["target_rate"]:.3f} pixel_rmse={r["pixel_rmse"]:.3f}')
    report['pairs'].append(entry)
  return report


def _write_json(path: str, obj) -> None:
  storage.write_text(path, json.dumps(obj, indent=2))


def run_stage(config, workdir: str, *, classify=None) -> dict:
  """Writes the translation grids (and quality.json with a classifier) of a finished run.

  Grids that exist are kept (rerunning the stage is cheap). ``classify``: the
  classifier to score translations with; default the eval stage's, if saved.
  Returns {pair file: row names}.
  """
  from gdistill.data import open_source  # pylint: disable=g-import-not-at-top
  t = config.translate
  work = ModelStore.open(workdir, config)
  for source, target in t.pairs:
    for label in (source, target):
      if not 0 <= label < work.num_classes:
        raise ConfigError(f'translate.pairs={tuple(map(tuple, t.pairs))!r}: class {label} is out '
                          f'of range (the dataset has classes 0..{work.num_classes - 1})')
  out_dir = os.path.join(work.path, TRANSLATE_DIR)
  routes = stage_routes(config, work)
  translator = Translator(work, encode_w=t.encode_w, w=t.w)
  eval_source = open_source(config.data.name, split=config.data.eval_split,
                            data_dir=config.data.data_dir or None, download=config.data.download)
  rows = ['input'] + [f'{r.name} ({r.encoder} -> {r.decoder})' for r in routes]
  index = {}
  for source, target in t.pairs:
    path = os.path.join(out_dir, pair_file(work, source, target))
    index[os.path.basename(path)] = rows
    if storage.exists(path):
      continue
    x = class_images(eval_source, source, t.num_per_pair)
    grid = np.stack([x] + [translator(r, x, source, target) for r in routes])  # [R, n, H, W, C]
    if jax.process_index() == 0:
      save_grid(grid, path)
      log(f'wrote {path}')
  if jax.process_index() == 0:
    _write_json(os.path.join(out_dir, 'grids.json'), index)
  classify = classify or saved_classifier(config, work.path)
  quality_path = os.path.join(out_dir, QUALITY_FILE)
  if classify is not None and not storage.exists(quality_path):
    report = quality_report(config, work, translator, routes, eval_source, classify)
    if jax.process_index() == 0:
      _write_json(quality_path, report)
      log(f'wrote {quality_path}')
  elif classify is None:
    log('translate: no evaluation classifier found; skipping quality.json')
  return index
