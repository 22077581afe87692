"""The demo's shipped models: the embedded default's teacher and three of its distilled
students, sampled, timed and translated with no workdir and no dataset.

  gdistill/weights/fashion_mnist_teacher.msgpack          the guided teacher (2 NFE a step)
  gdistill/weights/fashion_mnist_student_{8,4,1}step.msgpack
                                                          stage-2 students of one run of
                                                          configs/fashion_mnist.py (float16
                                                          storage, read back as float32);
                                                          each sidecar says how it was made
                                                          and holds its rows of that run's
                                                          report
  gdistill/weights/fashion_mnist_report.json              that run's eval/report.json

``notebooks/demo.ipynb`` shows them first; the command line samples them too
(``python -m gdistill.sample --model=gdistill/weights/fashion_mnist_student_4step.msgpack
--steps=4 --w=1 --class=sneaker --output=s.png``).

Shipping students of a finished run (what made the files in gdistill/weights/):

  python -m gdistill.demo ship --workdir=runs/fashion_mnist
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights')
TEACHER_FILE = os.path.join(WEIGHTS, 'fashion_mnist_teacher.msgpack')
REPORT_FILE = os.path.join(WEIGHTS, 'fashion_mnist_report.json')
STUDENT_STEPS = (8, 4, 1)


def student_file(steps: int, weights_dir: str = WEIGHTS) -> str:
  return os.path.join(weights_dir, f'fashion_mnist_student_{steps}step.msgpack')


# ---- shipping -----------------------------------------------------------------------


def ship(workdir: str, *, weights_dir: str = WEIGHTS,
         steps: Sequence[int] = STUDENT_STEPS) -> list[dict]:
  """Exports the ``steps``-step DDIM students of a finished run (float16) with their report
  rows and claims, and copies its report; returns the sidecars written."""
  from gdistill import checkpoint, storage, teacher_file  # pylint: disable=g-import-not-at-top
  from gdistill.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from gdistill.eval import workdir_config  # pylint: disable=g-import-not-at-top
  from gdistill.model_store import ModelStore  # pylint: disable=g-import-not-at-top

  config = workdir_config.get_config(storage.absolute(workdir))
  report_path = os.path.join(workdir, 'eval', 'report.json')
  if not storage.isfile(report_path):
    raise CheckpointError(f'--workdir={workdir}: no eval/report.json (expected a run whose '
                          f'eval stage finished)')
  report = json.loads(storage.read_bytes(report_path))
  work = ModelStore.open(workdir, config)
  written = []
  for n in steps:
    phase = work.student_phase('ddim', n)
    if phase is None:
      raise CheckpointError(f'--workdir={workdir}: no {n}-step student (it holds: '
                            f'{work.describe()})')
    label = f'ddim {n} steps'
    rows = [r for r in report['rows'] if r['model'] == 'student' and r['steps'] == n]
    claims = [c for c in report.get('claims', []) if c.get('student') == label]
    written.append(teacher_file.export_phase(
        checkpoint.phase_dir(workdir, phase), student_file(n, weights_dir), config=config,
        dtype='float16', extra_info={
            'made_by': f'python -m gdistill.main --config=configs/fashion_mnist.py (seed '
                       f'{config.seed}), exported by python -m gdistill.demo ship on '
                       f'{time.strftime("%Y-%m-%d")}',
            'report_rows': rows, 'claims': claims,
            'claims_passed': f'{sum(bool(c["passed"]) for c in claims)}/{len(claims)}'}))
  os.makedirs(weights_dir, exist_ok=True)
  with open(os.path.join(weights_dir, os.path.basename(REPORT_FILE)), 'w') as f:
    json.dump(report, f, indent=1, sort_keys=True)
    f.write('\n')
  return written


# ---- the shipped models -------------------------------------------------------------


class Shipped:
  """The teacher and the students of ``steps``, each loaded once; one compiled sampler per
  mode (the students share one: same network, step count traced)."""

  def __init__(self, steps: Sequence[int] = STUDENT_STEPS, weights_dir: str = WEIGHTS):
    from gdistill import teacher_file  # pylint: disable=g-import-not-at-top
    from gdistill.model_store import Model, ModelStore  # pylint: disable=g-import-not-at-top
    self.teacher_store, self.teacher = ModelStore.open_file(
        os.path.join(weights_dir, os.path.basename(TEACHER_FILE)))
    self.students, self.info = {}, {}
    self.store = None
    for n in steps:
      path = student_file(n, weights_dir)
      if self.store is None:
        self.store, model = ModelStore.open_file(path)
      else:
        params, meta = teacher_file.load_params(
            path, expect=self.store.expected_meta(use_w=True),
            abstract_params=self.store.abstract_params(use_w=True))
        model = Model(phase=meta.get('phase'), net=self.store.denoiser(use_w=True),
                      params=params, meta=meta, mode='student')
      self.students[n] = model
      self.info[n] = teacher_file.read_info(path)

  @property
  def class_names(self) -> list[str]:
    return list(self.store.class_names)

  def sample(self, model, steps: int, labels, w: float, z_1):
    """Images [B, H, W, C] in [-1, 1] by DDIM, and the seconds it took (compiled already)."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    store = self.teacher_store if model is self.teacher else self.store
    fn = store.sampler(model.mode, 'ddim')
    args = (model.params, jnp.asarray(labels, jnp.int32), jnp.float32(w), z_1,
            jnp.int32(steps), jax.random.PRNGKey(0))
    jax.block_until_ready(fn(*args[:4], jnp.int32(1), args[5]))  # compile, warm
    start = time.perf_counter()
    x = jax.block_until_ready(fn(*args))
    return x, time.perf_counter() - start

  def rows(self, teacher_steps: int = 64):
    """(label, model, steps, NFE per sample) of the comparison: teacher first."""
    out = [(f'teacher, {teacher_steps} steps', self.teacher, teacher_steps, 2 * teacher_steps)]
    out += [(f'student, {n} step{"s" if n > 1 else ""}', m, n, n)
            for n, m in sorted(self.students.items(), reverse=True)]
    return out

  def translate(self, x, *, source: int, target: int, encode_steps: int = 32,
                decode_steps: int = 4, encode_w: float = 0.0, w: float = 1.0):
    """x [B, H, W, C] of class ``source`` -> class ``target``: the teacher's DDIM encoder
    (``encode_steps``, conditional at ``encode_w``) and the ``decode_steps`` student."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from gdistill import translation  # pylint: disable=g-import-not-at-top
    dec = self.students[decode_steps]
    fn = translation.make_translate_fn(encode_net=self.teacher.net, decode_net=dec.net,
                                       encode_mode='guided', decode_mode='student')
    b = x.shape[0]
    return fn(self.teacher.params, dec.params, jnp.asarray(x, jnp.float32),
              jnp.full((b,), source, jnp.int32), jnp.full((b,), target, jnp.int32),
              jnp.float32(encode_w), jnp.float32(w), jnp.int32(encode_steps),
              jnp.int32(decode_steps), jnp.bool_(True))


def report_rows(path: str = REPORT_FILE) -> tuple[list[dict], Optional[dict]]:
  """The shipped run's report rows and real-data floor."""
  with open(path) as f:
    rep = json.load(f)
  return rep['rows'], rep.get('floor')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m gdistill.demo',
                              description='The demo\'s shipped students.')
  sub = p.add_subparsers(dest='command', required=True)
  s = sub.add_parser('ship', help='export a finished run\'s 8-, 4- and 1-step students')
  s.add_argument('--workdir', required=True, help='workdir of a finished fashion_mnist run')
  s.add_argument('--weights_dir', default=WEIGHTS, help='where to write (default: the package)')
  args = p.parse_args(argv)
  from gdistill import cli_setup  # pylint: disable=g-import-not-at-top
  with cli_setup.user_errors():
    for info in ship(args.workdir, weights_dir=args.weights_dir):
      print(f'wrote {info["weights"]["file"]} ({info["phase"]} step {info["step"]}, '
            f'{info["weights"]["bytes"]:,} bytes, claims {info["claims_passed"]})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
