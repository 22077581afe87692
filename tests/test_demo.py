"""The demo's shipped students (gdistill/weights/, gdistill.demo): what their files say,
that they draw the classes they are asked for (scored by the shipped classifier), and the
one-command sampling right after install."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import smoke_workdir
from gdistill import demo, grids
from gdistill.eval import classifier as classifier_lib

REPO = smoke_workdir.REPO
CLASSIFIER = os.path.join(demo.WEIGHTS, 'fashion_mnist_classifier.npz')


def test_shipped_students_say_how_they_were_made_and_how_they_score():
  total = 0
  for n in demo.STUDENT_STEPS:
    path = demo.student_file(n)
    with open(os.path.splitext(path)[0] + '.json') as f:
      info = json.load(f)
    total += os.path.getsize(path) + os.path.getsize(os.path.splitext(path)[0] + '.json')
    assert info['use_w'] and info['student_steps'] == n and info['phase'] == f'stage2_n{n:04d}'
    assert info['weights']['dtype'] == 'float16'
    assert 'configs/fashion_mnist.py' in info['made_by']
    rows = info['report_rows']
    assert {r['w'] for r in rows} >= {0.0, 1.0, 4.0}
    assert all(r['model'] == 'student' and r['steps'] == n and r['fid'] > 0 for r in rows)
  total += os.path.getsize(demo.REPORT_FILE)
  assert total <= 10 * 2**20, f'the demo adds {total / 2**20:.1f} MB, expected at most 10'
  rows, floor = demo.report_rows()
  assert floor['fid'] > 0 and {r['model'] for r in rows} >= {'teacher', 'student'}


@pytest.fixture(scope='module')
def shipped():
  return demo.Shipped()


@pytest.mark.parametrize('steps', [4, 1])
def test_shipped_students_draw_the_classes_asked_for(shipped, steps):
  params, meta = classifier_lib.load_classifier(CLASSIFIER)
  classify = classifier_lib.ClassifierFeatures(params, num_classes=meta['num_classes'])
  labels = np.tile(np.arange(10, dtype=np.int32), 4)
  z_1 = jax.random.normal(jax.random.PRNGKey(5), (labels.shape[0], 28, 28, 1))
  x, seconds = shipped.sample(shipped.students[steps], steps, labels, 1.0, z_1)
  assert seconds > 0
  _, logits = classify(grids.to_uint8(np.asarray(x)))
  accuracy = float(np.mean(np.argmax(logits, -1) == labels))
  # Measured 2026-12-02: 4 steps 0.95+, 1 step 0.9+; noise (a broken file) scores ~0.1.
  assert accuracy >= 0.8, f'{steps}-step student: classifier accuracy {accuracy:.2f}'


def test_translation_with_the_shipped_models_reaches_the_target_class(shipped):
  params, meta = classifier_lib.load_classifier(CLASSIFIER)
  classify = classifier_lib.ClassifierFeatures(params, num_classes=meta['num_classes'])
  sneaker, boot = 7, 9
  x_in, _ = shipped.sample(shipped.students[8], 8, np.full((8,), sneaker, np.int32), 1.0,
                           jax.random.normal(jax.random.PRNGKey(3), (8, 28, 28, 1)))
  x_out = np.asarray(shipped.translate(x_in, source=sneaker, target=boot))
  _, logits_in = classify(grids.to_uint8(np.asarray(x_in)))
  _, logits_out = classify(grids.to_uint8(x_out))
  assert np.mean(np.argmax(logits_in, -1) == sneaker) >= 0.75
  assert np.mean(np.argmax(logits_out, -1) == boot) >= 0.75


def _sample(*args):
  return subprocess.run([sys.executable, '-m', 'gdistill.sample', *args], cwd=REPO,
                        env=smoke_workdir.subprocess_env(), capture_output=True, text=True,
                        timeout=300)


def test_sample_a_shipped_student_right_after_install(tmp_path):
  out = tmp_path / 's.png'
  proc = _sample(f'--model={demo.student_file(4)}', '--steps=4', '--w=1', '--class=sneaker',
                 f'--output={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert out.stat().st_size > 0 and 'stage2_n0004' in proc.stdout
  proc = _sample(f'--model={demo.student_file(4)}', '--steps=8', f'--output={tmp_path / "x.png"}')
  assert proc.returncode == 2 and 'is the 4-step student' in proc.stderr.strip().splitlines()[-1]
  assert not (tmp_path / 'x.png').exists()


def _translate(*args):
  return subprocess.run([sys.executable, '-m', 'gdistill.translate', *args], cwd=REPO,
                        env=smoke_workdir.subprocess_env(), capture_output=True, text=True,
                        timeout=300)


@pytest.mark.slow  # 30 s; test_latent's exported student runs the same --model route
def test_translate_with_one_file_models(tmp_path):
  shoes, boots = tmp_path / 'shoes.png', tmp_path / 'boots.png'
  proc = _sample(f'--model={demo.student_file(8)}', '--steps=8', '--w=1', '--class=sneaker',
                 '--num=4', f'--output={shoes}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = _translate(f'--model={demo.student_file(4)}', f'--encoder={demo.TEACHER_FILE}',
                    '--encode_steps=16', '--source_class=sneaker', '--target_class=ankle boot',
                    '--steps=4', f'--input={shoes}', f'--output={boots}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  # teacher DDIM encoder: 2 x (16 - 1) evaluations, then the 4-step student: 4.
  assert 'teacher -> stage2_n0004, 34 network evaluations each' in proc.stdout, proc.stdout
  assert boots.stat().st_size > 0
  for args, fragment in (
      (('--workdir=x', f'--encoder={demo.TEACHER_FILE}'), '--encoder needs --model=FILE'),
      ((f'--model={demo.student_file(4)}', '--workdir=x'), 'give one'),
      (('--model=weights.bin',), 'expected auto, distilled, ddim, teacher or a one-file model')):
    proc = _translate(*args, '--source_class=7', '--target_class=9', '--steps=4',
                      f'--input={shoes}', f'--output={tmp_path / "never.png"}')
    assert proc.returncode == 2 and fragment in proc.stderr.strip().splitlines()[-1], proc.stderr
  assert not (tmp_path / 'never.png').exists()
