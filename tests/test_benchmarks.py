"""The benchmark scripts run and write the records CI dashboards read.

No timing is asserted (speed is the benchmarks' business, not the tests'):
these check that the scripts work and that what they count is consistent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import smoke_workdir

BENCH = os.path.join(smoke_workdir.REPO, 'benchmarks')
HEADLINE = ('teacher_step_peak_fraction', 'stage1_step_over_teacher_step',
            'stage2_step_over_teacher_step', 'sampling_speedup_over_nfe_ratio',
            'sampler_compile_ratio_1024_over_4', 'dit_teacher_step_peak_fraction',
            'dit_stage1_step_peak_fraction')


def _bench(script, *args, tmp_path, timeout=900):
  out = tmp_path / 'records.json'
  proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args, f'--json={out}'],
                        capture_output=True, text=True, cwd=smoke_workdir.REPO,
                        env=smoke_workdir.subprocess_env(), timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = json.loads(out.read_text())
  assert all(set(r) == {'name', 'value', 'unit'} for r in records), records
  return {r['name']: r['value'] for r in records}, proc.stdout


@pytest.mark.slow  # CI time: 22 s of lowering three steps
def test_model_flops_of_the_stages(tmp_path):
  """Lowered on abstract inputs: a stage-1/2 step is a teacher step plus two
  forward passes of the network (backward ~2 forwards), so ~5/3 of its FLOPs."""
  flops, stdout = _bench('model_flops.py', '--quick', tmp_path=tmp_path)
  assert 'GFLOP/image' in stdout
  teacher = flops['teacher_step_flops']
  assert teacher > 1e9  # the smoke U-Net, batch 16: about 4.5 GFLOP
  for stage in ('stage1', 'stage2'):
    assert 1.5 < flops[f'{stage}_step_flops'] / teacher < 1.8, flops


@pytest.mark.slow
def test_run_quick_writes_the_headline_records(tmp_path):
  records, stdout = _bench('run.py', '--quick', tmp_path=tmp_path)
  for name in HEADLINE:
    assert name in records and records[name] > 0, name
  assert 'Headline' in stdout and 'wall: train' in stdout


@pytest.mark.slow  # CI time (see README: slow tests)
def test_dit_steps_beside_the_configs_unet(tmp_path):
  """dit_steps.py: the tiny DiT's teacher and stage-1 steps on the smoke config's data,
  each with its fraction of the matmul peak, under ``dit_`` names; no stage 2."""
  records, stdout = _bench('dit_steps.py', '--quick', tmp_path=tmp_path)
  for step in ('teacher', 'stage1'):
    assert 0 < records[f'dit_{step}_step_peak_fraction'] < 1, records
    assert records[f'dit_{step}_step_flops'] > 0
  assert records['dit_stage1_step_over_teacher_step'] > 0
  # Stage 1 adds two teacher forward passes (backward ~2 forwards): ~5/3 of the FLOPs.
  assert 1.4 < records['dit_stage1_step_flops'] / records['dit_teacher_step_flops'] < 1.9
  assert not any(name.startswith('dit_stage2') for name in records)
  assert 'with DiT tiny' in stdout and 'model dit tiny ' in stdout and 'patch_size=4' in stdout


@pytest.mark.slow  # CI time (see README: slow tests)
def test_loop_benchmark_times_the_input_pipeline_alone(tmp_path):
  """The pipeline records only (the loop records train three phases: run.py's slow test
  covers them): the embedded data and a small 64x64x3 array_record file, in-process."""
  records, stdout = _bench('loop.py', '--quick', '--only=pipeline', '--workers=0',
                           '--pipeline-examples=300', '--pipeline-images=512',
                           tmp_path=tmp_path)
  assert records['input_pipeline_images_per_s'] > 0
  assert records['input_pipeline_64x64x3_images_per_s_workers0'] > 0
  assert 'input pipeline alone' in stdout and '64x64x3 array_record' in stdout
