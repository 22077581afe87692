"""Class-conditional CIFAR-10 at the authors' full-scale settings.

Teacher U-Net: 256 channels, mult (1, 1, 1), 3 residual blocks, attention at
16 and 8, dropout 0.2, batch 128 (METHOD.md section 7). Needs the TFDS
``cifar10`` dataset prepared in array_record format (run once with internet and
TensorFlow installed: ``--config.data.download=True``) and an accelerator.

  python -m gdistill.main --config=configs/cifar10.py --workdir=gs://BUCKET/cifar10 \
      --config.eval.inception_weights=PATH/pt_inception-2015-12-05.pth

Every training setting gdistill can express is the authors' (google-research
``ddpm_w_distillation/ddpm_w_distillation/config/``: the teacher's
``cifar_retrain_unet3.py``, stage 1's ``cifar_condw_stage1_distill.py``, stage 2's
``cifar_condw_stage2_distill.py`` and ``cifar_condw_stage2_nvidia_distill.py``); each
line names its file. docs/paper_settings.md lists them with file and line, the two
kept on purpose (bfloat16, stage2.time_grid='both') with the override that gives the
authors' value, and the settings gdistill has no option for yet (among them the
teacher's weight decay 0.001); tests/test_paper_settings.py pins this file to that
table.

The 'eval' stage computes FID/IS with the standard FID Inception-v3, whose
weights gdistill cannot download for you: pass their local path (.pth or .npz,
see gdistill/eval/inception.py), or leave 'eval' out of --config.stages. The
run checks this before it trains.
"""

from gdistill.config_base import base_config


def get_config():
  c = base_config()
  c.stages = ('teacher', 'stage1', 'stage2', 'eval')
  c.data.name = 'cifar10'
  # The authors compute in float32 (w_unet3.py asserts float32 inputs; no dtype option in
  # cifar_retrain_unet3.py); bfloat16 here for accelerator speed and memory (params stay
  # float32). --config.precision=float32 gives the authors' setting.
  c.precision = 'bfloat16'
  c.sharding = 'replicated'
  c.diffusion.mean_type = 'v'  # cifar_retrain_unet3.py, cifar_condw_stage*_distill.py: mean_type='v'
  c.model.update(
      size='cifar10',
      ch=256,                           # cifar_retrain_unet3.py (ch)
      ch_mult=(1, 1, 1),                # cifar_retrain_unet3.py (ch_mult)
      num_res_blocks=3,                 # cifar_retrain_unet3.py (num_res_blocks)
      attn_resolutions=(16, 8),         # cifar_retrain_unet3.py (attn_resolutions)
      dropout=0.2,                      # cifar_retrain_unet3.py (the teacher's dropout)
      resblock_resample=True,           # cifar_retrain_unet3.py (resblock_resample)
      w_embedding='authors',            # cifar_condw_stage1_distill.py (w_input_type='inv_cos')
      w_warmup_steps=10_000)            # cifar_condw_stage1_distill.py (w_warmup_steps)
  # Students' w ~ U[0, 4]: cifar_condw_stage1_distill.py / cifar_condw_stage2_distill.py
  # (train_w_schedule, uniform, 0 to 4).
  c.guidance.update(w_min=0.0, w_max=4.0)
  # The guided teacher sampled as the authors' (cifar_retrain_unet3.py: eval_clip_denoised=True; dpm.py
  # clips each network's x-hat, conditional and unconditional, before combining them).
  c.guidance.teacher_clip = 'branches'
  c.log_every = 100
  c.teacher.update(
      # 480k: the authors' teacher is checkpoint_480000 of its run
      # (cifar_condw_stage1_distill.py, teacher_ckpt_path).
      num_steps=480_000,
      batch_size=128,             # cifar_retrain_unet3.py
      learning_rate=2e-4,               # cifar_retrain_unet3.py
      warmup_steps=10_000,              # cifar_retrain_unet3.py (learning_rate_warmup_steps)
      lr_decay='constant',              # cifar_retrain_unet3.py (no annealing)
      grad_clip=1.0,                    # cifar_retrain_unet3.py
      ema_decay=0.9999,                 # cifar_retrain_unet3.py
      weighting='snr',                  # cifar_retrain_unet3.py (mean_loss_weight_type='snr')
      checkpoint_every=5000)
  c.teacher.p_uncond = 0.1              # cifar_retrain_unet3.py (uncond_prob)
  c.stage1.update(
      # 620k: stage 2 starts from checkpoint_620000 of the authors' stage-1 run
      # (cifar_condw_stage2_distill.py, teacher_ckpt_path).
      num_steps=620_000,
      batch_size=128,             # cifar_condw_stage1_distill.py (train_batch_size)
      learning_rate=1e-4,               # cifar_condw_stage1_distill.py
      warmup_steps=0,                   # cifar_condw_stage1_distill.py
      lr_decay='constant',              # cifar_condw_stage1_distill.py (no annealing)
      grad_clip=1.0,                    # cifar_condw_stage1_distill.py
      ema_decay=0.9999,                 # cifar_condw_stage1_distill.py
      dropout=0.0,                      # cifar_condw_stage1_distill.py
      weighting='snr',                  # cifar_condw_stage1_distill.py (mean_loss_weight_type)
      w_balance=False,                  # cifar_condw_stage1_distill.py: plain loss at every w
      w_min_frac=0.0,                   # cifar_condw_stage1_distill.py: every w ~ U[0, 4]
      checkpoint_every=5000)
  c.stage2.update(
      num_steps=50_000,                 # cifar_condw_stage2_distill.py (distill_steps_per_iter)
      batch_size=128,             # cifar_condw_stage2_distill.py (train_batch)
      learning_rate=1e-4,               # cifar_condw_stage2_distill.py (lr)
      warmup_steps=0,                   # cifar_condw_stage2_distill.py
      lr_decay='linear',                # cifar_condw_stage2_distill.py (anneal per halving)
      grad_clip=1.0,                    # cifar_condw_stage2_distill.py
      ema_decay=0.0,                    # cifar_condw_stage2_distill.py
      dropout=0.0,                      # cifar_condw_stage2_distill.py
      weighting='snr_trunc',            # cifar_condw_stage2_distill.py (mean_loss_weight_type)
      w_balance=False,                  # cifar_condw_stage2_distill.py: plain loss at every w
      start_steps=1024,                 # cifar_condw_stage2_distill.py (start_num_steps)
      min_steps=1,                      # cifar_condw_stage2_distill.py (end_num_steps)
      checkpoint_every=5000)
  # The authors train each N-step student on its DDIM grid (cifar_condw_stage2_distill.py)
  # and the stochastic sampler's students as separate runs
  # (cifar_condw_stage2_nvidia_distill.py, two_nvidia_distillation); 'both' trains one
  # student for both samplers. --config.stage2.time_grid=deterministic gives the authors'
  # DDIM students.
  c.stage2.time_grid = 'both'
  # The stochastic sampler's own students (stage2.stochastic) as the authors train
  # them (cifar_condw_stage2_nvidia_distill.py, two_nvidia_distillation): off here, the
  # 'both' students serve that sampler;
  # --config.stage2.stochastic.sampler_steps=(512, 256, 128, 64, 32, 16, 8, 4, 2)
  # with time_grid=deterministic trains one per step count, each from a copy of its teacher.
  c.stage2.stochastic.update(          # values: cifar_condw_stage2_nvidia_distill.py
      num_steps=50_000,                 # distill_steps_per_iter
      batch_size=128,                   # train_batch
      learning_rate=1e-4,               # lr
      warmup_steps=0,                   # learning_rate_warmup_steps
      lr_decay='linear',                # learning_rate_anneal_type (per halving)
      grad_clip=1.0,                    # grad_clip
      ema_decay=0.0,                    # ema_decay
      dropout=0.0,                      # model.args.dropout
      weighting='snr_trunc',            # mean_loss_weight_type
      init='teacher',                   # "teacher checkpoint ... initial params of student"
      checkpoint_every=5000)
  # FID-50k as in the paper; the batch splits over 8 to 1024 devices.
  c.eval.update(num_samples=50_000, batch_size=1024)
  c.samples.update(per_class=8, teacher_steps=256, teacher_w=1.0, student_w=(0.0, 0.3, 1.0, 4.0))
  return c
