"""notebooks/demo.ipynb: the result first (shipped models, a few minutes on CPU), executed
headless (nbclient) as committed; and, slow, its pipeline part on the smoke config.

The committed notebook holds the outputs of its first part (what a visitor sees without
running it). Its parameters cell keeps ``RUN_PIPELINE = False``; the slow test injects a
cell after it that turns the pipeline on with ``configs/smoke.py`` and points WORKDIR at
the session's smoke workdir, so the training phases load instead of retraining (the eval
stage and the command-line cells still run). Any cell error fails a test.
"""

import os
import time

import nbformat
import pytest

import smoke_workdir

NOTEBOOK = os.path.join(smoke_workdir.REPO, 'notebooks', 'demo.ipynb')
TIMING_HEADER = 'seconds (20 samples)'


def _parameter_cell(nb) -> int:
  for i, cell in enumerate(nb.cells):
    if 'parameters' in cell.get('metadata', {}).get('tags', []):
      return i
  raise AssertionError('demo.ipynb has no cell tagged "parameters"')


def _outputs(nb, cells=None):
  return [o for i, cell in enumerate(nb.cells) if cell.cell_type == 'code'
          and (cells is None or i in cells) for o in cell.get('outputs', [])]


def _images(outputs):
  return [o for o in outputs if 'image/png' in o.get('data', {})]


def _text(outputs):
  return ''.join(o.get('text', '') for o in outputs if o.get('output_type') == 'stream')


def _execute(nb, timeout):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  NotebookClient(nb, timeout=timeout, kernel_name='python3',
                 resources={'metadata': {'path': smoke_workdir.REPO}}).execute()


def test_committed_notebook_shows_the_result_and_keeps_the_pipeline_off():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  i = _parameter_cell(nb)
  assert 'RUN_PIPELINE = False' in nb.cells[i].source
  assert "CONFIG = 'configs/fashion_mnist.py'" in nb.cells[i].source
  first = _outputs(nb, range(i))
  assert len(_images(first)) == 3, 'expected the samples, FID-vs-NFE and translation figures'
  assert TIMING_HEADER in _text(first) and 'teacher, 64 steps' in _text(first)
  assert not any(o.get('output_type') == 'error' for o in _outputs(nb))


@pytest.mark.slow  # 70 s; the fast suite checks the committed outputs and test_demo the calls
def test_notebook_runs_headless_and_shows_the_result_first(monkeypatch):
  for key, value in smoke_workdir.subprocess_env().items():
    if os.environ.get(key) != value:
      monkeypatch.setenv(key, value)  # the kernel inherits these
  nb = nbformat.read(NOTEBOOK, as_version=4)
  start = time.perf_counter()
  _execute(nb, timeout=300)
  minutes = (time.perf_counter() - start) / 60
  outputs = _outputs(nb, range(_parameter_cell(nb)))
  assert len(_images(outputs)) == 3
  text = _text(outputs)
  assert TIMING_HEADER in text and 'student, 1 step' in text, text[-2000:]
  assert 'RUN_PIPELINE = False: skipped' in _text(_outputs(nb))
  assert minutes < 5, f'the notebook took {minutes:.1f} minutes, expected under 5 on CPU'


@pytest.mark.slow
def test_notebook_pipeline_part_runs_end_to_end(monkeypatch, fashion_data_dir, tmp_path):
  workdir = smoke_workdir.get(fashion_data_dir)
  for key, value in smoke_workdir.subprocess_env().items():
    if os.environ.get(key) != value:
      monkeypatch.setenv(key, value)  # the kernel and its commands inherit these
  nb = nbformat.read(NOTEBOOK, as_version=4)
  i = _parameter_cell(nb)
  nb.cells.insert(i + 1, nbformat.v4.new_code_cell(
      f"RUN_PIPELINE = True\nCONFIG = 'configs/smoke.py'\nWORKDIR = {workdir!r}"))
  try:
    _execute(nb, timeout=3600)  # raises CellExecutionError on the first failing cell
  finally:
    nbformat.write(nb, str(tmp_path / 'demo_executed.ipynb'))  # to inspect a failure
  assert len(_images(_outputs(nb, range(i + 1, len(nb.cells))))) >= 4, (
      'expected the sample, FID, translation and CLI figures of the run')
  assert 'skipped' not in _text(_outputs(nb, range(i + 1, len(nb.cells))))
  assert os.path.exists(os.path.join(workdir, 'translate', 'quality.json'))
