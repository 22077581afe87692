"""Class-conditional ImageNet 64x64 at the authors' full-scale settings.

Teacher U-Net: 192 channels, mult (1, 2, 3, 4), 3 residual blocks, attention
at 32, 16 and 8, dropout 0.1, batch 2048, bfloat16 compute, FSDP over the data
axis (METHOD.md section 7). Needs TFDS ``imagenet_resized/64x64`` prepared in
array_record format and a TPU pod slice or GPUs (see launch/README.md).

  python -m gdistill.main --config=configs/imagenet64.py --workdir=gs://BUCKET/imagenet64 \
      --config.eval.inception_weights=PATH/pt_inception-2015-12-05.pth

Every training setting gdistill can express is the authors' (google-research
``ddpm_w_distillation/ddpm_w_distillation/config/``: the teacher's
``i64_retrain_unet3.py``, stage 1's ``i64_condw_stage1_distill.py``, stage 2's
``i64_condw_stage2_distill.py`` and ``i64_condw_stage2_nvidia_distill.py``, the
encoder's ``i64_encode_condw_stage2_distill.py``); each line names its file.
docs/paper_settings.md lists them with file and line, the two kept on purpose
(bfloat16, stage2.time_grid='both') with the override that gives the authors'
value, and the settings gdistill has no option for yet; tests/test_paper_settings.py
pins this file to that table.

The 'eval' stage computes FID/IS with the standard FID Inception-v3, whose
weights gdistill cannot download for you: pass their local path (.pth or .npz,
see gdistill/eval/inception.py), or leave 'eval' out of --config.stages. The
run checks this before it trains. The FID reference is the first 50,000
training images (eval.reference_examples; 0 would embed all 1.28M).
"""

from gdistill.config_base import base_config


def get_config():
  c = base_config()
  c.stages = ('teacher', 'stage1', 'stage2', 'eval')
  c.data.name = 'imagenet_resized/64x64'
  c.data.eval_split = 'validation'
  # The authors compute in float32 (w_unet3.py asserts float32 inputs; no dtype option in
  # i64_retrain_unet3.py); bfloat16 here for TPU speed and memory (params stay float32).
  # --config.precision=float32 gives the authors' setting.
  c.precision = 'bfloat16'
  c.sharding = 'fsdp'
  c.diffusion.mean_type = 'v'  # i64_retrain_unet3.py, i64_condw_stage*_distill.py: mean_type='v'
  # remat: each U-Net block recomputed in the backward pass, which keeps only block
  # inputs, for about 1/3 more step compute. Bytes per device at 128 images per device
  # (2048 over 16), benchmarks/memory.py compiled for one CPU device (2026-12-01):
  # teacher peak 112.6 GiB without remat, 103.6 with; stage 1 (measured at 2048 too,
  # before it took the authors' 256) 108.3 / 99.0. That is XLA:CPU's plan (remat saves
  # 8 % there); run it on the accelerator before launching.
  c.model.update(
      size='imagenet64',
      ch=192,                           # i64_retrain_unet3.py (ch)
      ch_mult=(1, 2, 3, 4),             # i64_retrain_unet3.py (ch_mult)
      num_res_blocks=3,                 # i64_retrain_unet3.py (num_res_blocks)
      attn_resolutions=(32, 16, 8),     # i64_retrain_unet3.py (attn_resolutions)
      dropout=0.1,                      # i64_retrain_unet3.py (the teacher's dropout)
      attn_head_dim=64,                 # i64_retrain_unet3.py (head_dim=64, num_heads=None)
      resblock_resample=True,           # i64_retrain_unet3.py (resblock_resample)
      w_embedding='authors',            # i64_condw_stage1_distill.py (w_input_type='inv_cos')
      w_warmup_steps=10_000,            # i64_condw_stage1_distill.py (w_warmup_steps)
      remat=True)
  # Students' w ~ U[0, 4]: i64_condw_stage1_distill.py / i64_condw_stage2_distill.py
  # (train_w_schedule, uniform, 0 to 4).
  c.guidance.update(w_min=0.0, w_max=4.0)
  # The guided teacher sampled as the authors' (i64_retrain_unet3.py: eval_clip_denoised=True; dpm.py
  # clips each network's x-hat, conditional and unconditional, before combining them).
  c.guidance.teacher_clip = 'branches'
  c.log_every = 100
  c.teacher.update(
      # 220k: the authors' teacher is checkpoint_220000 of its run
      # (i64_condw_stage1_distill.py, teacher_ckpt_path).
      num_steps=220_000,
      batch_size=2048,            # i64_retrain_unet3.py
      learning_rate=3e-4,               # i64_retrain_unet3.py
      warmup_steps=10_000,              # i64_retrain_unet3.py (learning_rate_warmup_steps)
      lr_decay='constant',              # i64_retrain_unet3.py (no annealing)
      grad_clip=1.0,                    # i64_retrain_unet3.py
      ema_decay=0.9999,                 # i64_retrain_unet3.py
      weighting='snr',                  # i64_retrain_unet3.py (mean_loss_weight_type='snr')
      checkpoint_every=5000)
  c.teacher.p_uncond = 0.1              # i64_retrain_unet3.py (uncond_prob)
  c.stage1.update(
      # Not stated by the authors: stage 2 starts from checkpoint_20000 of a run that
      # continued another (i64_condw_stage2_distill.py, teacher_ckpt_path).
      num_steps=50_000,
      batch_size=256,             # i64_condw_stage1_distill.py (train_batch_size)
      learning_rate=3e-4,               # i64_condw_stage1_distill.py
      warmup_steps=0,                   # i64_condw_stage1_distill.py
      lr_decay='constant',              # i64_condw_stage1_distill.py (no annealing)
      grad_clip=1.0,                    # i64_condw_stage1_distill.py
      ema_decay=0.9999,                 # i64_condw_stage1_distill.py
      dropout=0.0,                      # i64_condw_stage1_distill.py
      weighting='snr',                  # i64_condw_stage1_distill.py (mean_loss_weight_type)
      w_balance=False,                  # i64_condw_stage1_distill.py: plain loss at every w
      w_min_frac=0.0,                   # i64_condw_stage1_distill.py: every w ~ U[0, 4]
      checkpoint_every=5000)
  c.stage2.update(
      num_steps=50_000,                 # i64_condw_stage2_distill.py (distill_steps_per_iter)
      batch_size=256,             # i64_condw_stage2_distill.py (train_batch)
      learning_rate=1e-4,               # i64_condw_stage2_distill.py (lr)
      warmup_steps=0,                   # i64_condw_stage2_distill.py
      lr_decay='linear',                # i64_condw_stage2_distill.py (anneal per halving)
      grad_clip=1.0,                    # i64_condw_stage2_distill.py
      ema_decay=0.0,                    # i64_condw_stage2_distill.py
      dropout=0.0,                      # i64_condw_stage2_distill.py
      weighting='snr_trunc',            # i64_condw_stage2_distill.py (mean_loss_weight_type)
      w_balance=False,                  # i64_condw_stage2_distill.py: plain loss at every w
      start_steps=1024,                 # i64_condw_stage2_distill.py (start_num_steps)
      min_steps=1,                      # i64_condw_stage2_distill.py (end_num_steps)
      checkpoint_every=5000)
  # The authors train each N-step student on its DDIM grid (i64_condw_stage2_distill.py)
  # and the stochastic sampler's students as separate runs (i64_condw_stage2_nvidia_distill.py,
  # two_nvidia_distillation); 'both' trains one student for both samplers.
  # --config.stage2.time_grid=deterministic gives the authors' DDIM students.
  c.stage2.time_grid = 'both'
  # The stochastic sampler's own students (stage2.stochastic) as the authors train
  # them (i64_condw_stage2_nvidia_distill.py, two_nvidia_distillation): off here, the
  # 'both' students serve that sampler;
  # --config.stage2.stochastic.sampler_steps=(512, 256, 128, 64, 32, 16, 8, 4, 2)
  # with time_grid=deterministic trains one per step count, each from a copy of its teacher.
  c.stage2.stochastic.update(          # values: i64_condw_stage2_nvidia_distill.py
      num_steps=50_000,                 # distill_steps_per_iter
      batch_size=256,                   # train_batch
      learning_rate=1e-4,               # lr
      warmup_steps=0,                   # learning_rate_warmup_steps
      lr_decay='linear',                # learning_rate_anneal_type (per halving)
      grad_clip=1.0,                    # grad_clip
      ema_decay=0.0,                    # ema_decay
      dropout=0.0,                      # model.args.dropout
      weighting='snr_trunc',            # mean_loss_weight_type
      init='teacher',                   # "teacher checkpoint ... initial params of student"
      checkpoint_every=5000)
  # Translation's encoder (a stage when 'translate' is in stages):
  # i64_encode_condw_stage2_distill.py.
  c.translate.update(
      encoder_start_steps=64,           # i64_encode_condw_stage2_distill.py (start_num_steps)
      encoder_min_steps=1)              # i64_encode_condw_stage2_distill.py (end_num_steps)
  c.translate.encoder.update(
      num_steps=5000,                   # i64_encode_condw_stage2_distill.py (distill_steps_per_iter)
      batch_size=256,             # i64_encode_condw_stage2_distill.py (train_batch)
      learning_rate=3e-4,               # i64_encode_condw_stage2_distill.py (lr)
      warmup_steps=0,                   # i64_encode_condw_stage2_distill.py
      lr_decay='linear',                # i64_encode_condw_stage2_distill.py (anneal per halving)
      grad_clip=1.0,                    # i64_encode_condw_stage2_distill.py
      ema_decay=0.0,                    # i64_encode_condw_stage2_distill.py
      dropout=0.0,                      # i64_encode_condw_stage2_distill.py
      weighting='constant',             # i64_encode_condw_stage2_distill.py (mean_loss_weight_type)
      time_grid='deterministic')        # i64_encode_condw_stage2_distill.py (its DDIM grid only)
  c.eval.reference_examples = 50_000
  # FID-50k as in the paper; the batch splits over 8 to 1024 devices.
  c.eval.update(num_samples=50_000, batch_size=1024)
  c.samples.update(per_class=8, teacher_steps=256, teacher_w=1.0, student_w=(0.0, 0.3, 1.0, 4.0))
  return c
