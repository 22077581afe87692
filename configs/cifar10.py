"""CIFAR-10 at the progressive-distillation paper's full-scale settings.

Teacher U-Net: 256 channels, mult (1, 1, 1), 3 residual blocks, attention at
16 and 8, dropout 0.2, batch 128 (METHOD.md section 7). Needs the TFDS
``cifar10`` dataset prepared in array_record format (run once with internet and
TensorFlow installed: ``--config.data.download=True``) and an accelerator.

  python -m gdistill.main --config=configs/cifar10.py --workdir=gs://BUCKET/cifar10 \
      --config.eval.inception_weights=PATH/pt_inception-2015-12-05.pth

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
  c.precision = 'bfloat16'
  c.sharding = 'replicated'
  c.model.update(size='cifar10', ch=256, ch_mult=(1, 1, 1), num_res_blocks=3,
                 attn_resolutions=(16, 8), dropout=0.2)
  c.log_every = 100
  c.teacher.update(num_steps=400_000, batch_size=128, learning_rate=2e-4, warmup_steps=5000,
                   ema_decay=0.9999, checkpoint_every=5000)
  c.teacher.p_uncond = 0.1
  c.stage1.update(num_steps=50_000, batch_size=128, learning_rate=1e-4, warmup_steps=1000,
                  ema_decay=0.9999, checkpoint_every=5000)
  c.stage2.update(num_steps=50_000, batch_size=128, learning_rate=1e-4, lr_decay='linear',
                  warmup_steps=0, checkpoint_every=5000, start_steps=1024, min_steps=1)
  # FID-50k as in the paper; the batch splits over 8 to 1024 devices.
  c.eval.update(num_samples=50_000, batch_size=1024)
  c.samples.update(per_class=8, teacher_steps=256, teacher_w=1.0, student_w=(0.0, 0.3, 1.0, 4.0))
  return c
