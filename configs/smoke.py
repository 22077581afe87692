"""A seconds-long run of the whole pipeline on a tiny U-Net, for tests.

  python -m gdistill.main --config=configs/smoke.py --workdir=/tmp/gdistill_smoke
"""

from gdistill.config_base import base_config


def get_config():
  c = base_config()
  c.data.name = 'fashion_mnist'
  c.model.update(size='tiny', ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                 dropout=0.0)
  c.log_every = 2
  for name, steps in (('teacher', 6), ('stage1', 4), ('stage2', 2)):
    getattr(c, name).update(num_steps=steps, batch_size=16, warmup_steps=1, checkpoint_every=2)
  c.stage2.start_steps = 8
  c.stage2.min_steps = 2
  c.samples.update(per_class=1, teacher_steps=4, student_w=(0.0, 2.0))
  return c
