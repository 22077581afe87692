"""The full set of config keys with defaults; each file in configs/ starts here.

Only the driver reads configs: everything below it takes keyword arguments.
"""

from __future__ import annotations

import ml_collections

PHASE_STAGES = ('teacher', 'stage1', 'stage2')


def _optim(**kw) -> ml_collections.ConfigDict:
  d = dict(num_steps=1000, batch_size=128, learning_rate=2e-4, warmup_steps=100,
           lr_decay='constant', grad_clip=1.0, ema_decay=0.0, checkpoint_every=500,
           dropout=None)
  d.update(kw)
  return ml_collections.ConfigDict(d)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Stages the driver runs in order. Training stages: teacher, stage1, stage2;
  # then eval (FID/IS sweep) and translate (image-to-image grids).
  c.stages = ('teacher', 'stage1', 'stage2')
  # A finished teacher to distil instead of training one: a workdir or its
  # checkpoints/teacher directory. Empty: train (or resume) the teacher here.
  c.teacher_checkpoint = ''
  c.multihost = False       # call jax.distributed.initialize() (auto on TPU pods)
  c.sharding = 'replicated'  # or 'fsdp'
  c.precision = 'float32'    # or 'bfloat16' (compute only; params stay float32)
  c.mesh = ml_collections.ConfigDict({'data': -1})
  c.log_every = 50

  c.data = ml_collections.ConfigDict(dict(
      name='fashion_mnist', split='train', eval_split='test', data_dir='', download=False))

  c.diffusion = ml_collections.ConfigDict(dict(mean_type='v', weighting='snr_trunc'))

  c.model = ml_collections.ConfigDict(dict(
      size='fmnist', ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,),
      dropout=0.1))

  # Guidance weights w: students are trained on w ~ U[w_min, w_max].
  c.guidance = ml_collections.ConfigDict(dict(w_min=0.0, w_max=4.0))

  c.teacher = _optim(num_steps=10000, learning_rate=2e-4, warmup_steps=200, ema_decay=0.999)
  c.teacher.p_uncond = 0.1
  c.stage1 = _optim(num_steps=2000, learning_rate=1e-4, warmup_steps=100, ema_decay=0.0,
                    dropout=0.0)
  # Stage 2: one halving from 2N to N steps each, from start_steps/2 down to min_steps.
  c.stage2 = _optim(num_steps=1000, learning_rate=1e-4, warmup_steps=0, lr_decay='linear',
                    ema_decay=0.0, dropout=0.0)
  c.stage2.start_steps = 64   # the stage-1 model is the 64-step teacher
  c.stage2.min_steps = 1
  c.stage2.time_grid = 'both'  # or 'deterministic'

  # Sample grids written when a phase finishes: a row per class.
  c.samples = ml_collections.ConfigDict(dict(
      per_class=8, teacher_steps=64, teacher_w=1.0, student_w=(0.0, 1.0, 4.0),
      every_checkpoint=False))

  c.checkpoint = ml_collections.ConfigDict(dict(max_to_keep=2))
  return c
