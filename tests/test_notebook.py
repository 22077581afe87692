"""Executes notebooks/demo.ipynb headless (nbclient) on the smoke config.

The notebook's parameter cell keeps ``CONFIG = 'configs/smoke.py'``; a cell
injected after it points WORKDIR at the session's smoke workdir, so the
training phases load instead of retraining (the eval stage and the command-line
cells still run). Any cell error fails the test.
"""

import os

import nbformat
import pytest

import smoke_workdir

NOTEBOOK = os.path.join(smoke_workdir.REPO, 'notebooks', 'demo.ipynb')


def _parameter_cell(nb) -> int:
  for i, cell in enumerate(nb.cells):
    if 'parameters' in cell.get('metadata', {}).get('tags', []):
      return i
  raise AssertionError('demo.ipynb has no cell tagged "parameters"')


def test_notebook_parameters_default_to_smoke():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  source = nb.cells[_parameter_cell(nb)].source
  assert "CONFIG = 'configs/smoke.py'" in source
  assert all(not cell.get('outputs') for cell in nb.cells if cell.cell_type == 'code')


@pytest.mark.slow
def test_notebook_runs_end_to_end(monkeypatch, fashion_data_dir, tmp_path):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  workdir = smoke_workdir.get(fashion_data_dir)
  for key, value in smoke_workdir.subprocess_env().items():
    if os.environ.get(key) != value:
      monkeypatch.setenv(key, value)  # the kernel and its commands inherit these
  nb = nbformat.read(NOTEBOOK, as_version=4)
  i = _parameter_cell(nb)
  nb.cells.insert(i + 1, nbformat.v4.new_code_cell(f'WORKDIR = {workdir!r}'))
  client = NotebookClient(nb, timeout=3600, kernel_name='python3',
                          resources={'metadata': {'path': smoke_workdir.REPO}})
  try:
    client.execute()  # raises CellExecutionError on the first failing cell
  finally:
    nbformat.write(nb, str(tmp_path / 'demo_executed.ipynb'))  # to inspect a failure
  outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.get('outputs', [])]
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 4, 'expected the sample, FID, translation and CLI figures'
  assert os.path.exists(os.path.join(workdir, 'translate', 'quality.json'))
