"""The console: progress lines (phase of the run, rates, ETAs) and what reaches the
terminal versus the log file (in a subprocess: the set-up changes the process's logging).
The smoke run's own console is checked in test_pipeline.py."""

import logging
import os
import subprocess
import sys
import textwrap

import pytest

from gdistill import console, metric_writer
from gdistill.metric_writer import Progress, RunProgress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = [('teacher', 'teacher', 100), ('stage1', 'distillation', 200),
          ('stage2_n0004', 'distillation', 50)]


def test_run_eta_is_unknown_until_every_remaining_group_has_a_rate():
  run = RunProgress(PHASES)
  assert run.tag('stage1') == '[2/3]'
  assert run.eta('teacher', 10, float('nan')) == 'run ETA unknown'
  assert run.eta('teacher', 50, 2.0) == 'run ETA unknown'  # no distillation rate yet
  assert run.eta('stage1', 100, 1.0) == 'run ETA 2m30s'  # 100 + 50 steps at 1 step/s
  assert run.eta('stage1', 110, float('nan')) == 'run ETA 2m20s'  # the last rate measured
  assert RunProgress(PHASES, more_work=True).eta('stage2_n0004', 0, 0.01) == 'run ETA >1h23m'


def test_progress_line_names_the_phase_and_fits_100_columns(monkeypatch):
  clock = iter([100.0, 700.0])
  monkeypatch.setattr(metric_writer.time, 'perf_counter', lambda: next(clock))
  names = ['stage1'] + [f'stage2_n{n:04d}' for n in (32, 16, 8, 4, 2, 1)] + [
      f'encoder_n{n:04d}' for n in (16, 8, 4)]
  run = RunProgress([(n, 'distillation', 1600) for n in names], more_work=True)
  progress = Progress(name='stage2_n0032', start_step=0, total_steps=1600, run=run)
  progress.start(1)
  line = progress.line(601, {'grad_norm': 0.56781, 'loss': 5.107e-12})
  assert line == ('[2/10] stage2_n0032 601/1600 grad_norm=0.5678 loss=5.107e-12 '
                  '1.00 steps/s ETA 16m39s, run ETA >3h49m'), line
  assert len(line) <= 100
  alone = Progress(name='teacher', start_step=0, total_steps=6)  # no run: no phase tag
  assert alone.line(2, {'loss': 0.5}) == 'teacher 2/6 loss=0.5'


_SCRIPT = textwrap.dedent('''
    import logging, os, sys
    from absl import app, logging as absl_logging
    from gdistill import cli_setup, console

    def main(argv):
      console.setup(hold=True)
      logging.getLogger('orbax').info('library info')
      absl_logging.warning('library warning')
      logging.getLogger('jax').error('library error')
      own = logging.makeLogRecord(dict(name='absl', levelno=logging.WARNING,
                                       levelname='WARNING', msg='own warning',
                                       pathname=os.path.join(os.path.dirname(console.__file__),
                                                             'checkpoint.py')))
      logging.getLogger().handle(own)
      console.line('held line')
      with console.output_to_log('tfds'):
        print('Downloading and preparing dataset')
        sys.stderr.write('\\rbar 10%\\rbar 100%\\x1b[A\\n')
      console.open_log(argv[1])
      console.line('after the log opened')
      cli_setup.fail('the end')  # in the log too

    app.run(main)
    ''')


def _run(workdir, *flags):
  return subprocess.run([sys.executable, '-c', _SCRIPT, *flags, str(workdir)], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_library_lines_go_to_the_log_file_errors_and_own_lines_to_the_terminal(tmp_path):
  proc = _run(tmp_path)
  assert proc.returncode == 2, proc.stderr
  log = tmp_path / console.LOG_FILE
  assert proc.stdout.splitlines() == [f'log: {log}', 'held line', 'after the log opened']
  err = proc.stderr.splitlines()
  assert len(err) == 3 and err[0].startswith('E') and err[0].endswith('] library error'), err
  assert err[1:] == ['gdistill: warning: own warning', 'gdistill: error: the end']
  text = log.read_text()
  for want in ('library info', 'library warning', 'library error', 'own warning', 'held line',
               'Downloading and preparing dataset', 'bar 100%'):
    assert want in text, (want, text)
  assert 'bar 10%' not in text and '] bar 100%\n' in text  # a bar's last state, plain
  assert text.splitlines()[-2].endswith('] after the log opened')  # timestamped, the caller
  assert text.splitlines()[-1].endswith('] gdistill: error: the end')
  assert _run(tmp_path).returncode == 2
  assert log.read_text().startswith(text)  # appended to


def test_verbosity_puts_library_lines_back_on_the_terminal(tmp_path):
  proc = _run(tmp_path, '--verbosity=0')
  assert proc.returncode == 2, proc.stderr
  for want in ('library info', 'library warning', 'library error'):
    assert want in proc.stderr, proc.stderr
  assert 'held line' not in proc.stderr  # gdistill's lines: once, on stdout
  assert (tmp_path / console.LOG_FILE).is_file()


@pytest.mark.parametrize('workdir,want', [
    ('/runs/x', '/runs/x/gdistill.log'),
    ('gs://bucket/runs/x', 'gs_bucket_runs_x/gdistill.log')])
def test_log_path(workdir, want):
  assert console.log_path(workdir).endswith(want)
  assert console.log_path(workdir, 1).endswith('gdistill.process1.log')


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full (Linux)')
def test_a_full_disk_ends_the_log_without_a_traceback(capsys):
  """Writes to a full disk fail: the log stops there (the command reports the disk in one
  line), no "--- Logging error ---" traceback on the terminal."""
  handler = console._LogFile()  # pylint: disable=protected-access
  handler.open('/dev/full')
  for msg in ('first', 'second'):
    handler.handle(logging.makeLogRecord({'msg': msg, 'levelno': logging.INFO}))
  assert handler.file is None
  assert capsys.readouterr().err == ''
