"""Class-conditional ImageNet 64x64 at the paper's full-scale settings.

Teacher U-Net: 192 channels, mult (1, 2, 3, 4), 3 residual blocks, attention
at 32, 16 and 8, dropout 0.1, batch 2048, bfloat16 compute, FSDP over the data
axis (METHOD.md section 7). Needs TFDS ``imagenet_resized/64x64`` prepared in
array_record format and a TPU pod slice or GPUs (see launch/README.md).

  python -m gdistill.main --config=configs/imagenet64.py --workdir=gs://BUCKET/imagenet64 \
      --config.eval.inception_weights=PATH/pt_inception-2015-12-05.pth

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
  c.precision = 'bfloat16'
  c.sharding = 'fsdp'
  # remat: each U-Net block recomputed in the backward pass, which keeps only block
  # inputs, for about 1/3 more step compute. Bytes per device at 128 images per device
  # (2048 over 16), benchmarks/memory.py compiled for one CPU device (2026-12-01):
  # teacher peak 112.6 GiB without remat, 103.6 with; stage 1 108.3 / 99.0. That is
  # XLA:CPU's plan (remat saves 8 % there); run it on the accelerator before launching.
  c.model.update(size='imagenet64', ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
                 attn_resolutions=(32, 16, 8), dropout=0.1, remat=True)
  c.log_every = 100
  c.teacher.update(num_steps=400_000, batch_size=2048, learning_rate=3e-4, warmup_steps=5000,
                   ema_decay=0.9999, checkpoint_every=5000)
  c.teacher.p_uncond = 0.1
  c.stage1.update(num_steps=50_000, batch_size=2048, learning_rate=1e-4, warmup_steps=1000,
                  ema_decay=0.9999, checkpoint_every=5000)
  c.stage2.update(num_steps=50_000, batch_size=2048, learning_rate=1e-4, lr_decay='linear',
                  warmup_steps=0, checkpoint_every=5000, start_steps=1024, min_steps=1)
  c.eval.reference_examples = 50_000
  # FID-50k as in the paper; the batch splits over 8 to 1024 devices.
  c.eval.update(num_samples=50_000, batch_size=1024)
  c.samples.update(per_class=8, teacher_steps=256, teacher_w=1.0, student_w=(0.0, 0.3, 1.0, 4.0))
  return c
