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
  c.consistency.update(num_steps=4, batch_size=16, warmup_steps=1, checkpoint_every=2,
                       grid_steps=8, skip=2, sample_steps=(1, 2))
  c.stage2.start_steps = 8
  c.stage2.min_steps = 2
  c.samples.update(per_class=1, teacher_steps=4, student_w=(0.0, 2.0))
  c.translate.update(encoder_start_steps=8, encoder_min_steps=2, num_per_pair=2, ddim_steps=8,
                     distilled_steps=(2, 4), quality_per_pair=4)
  c.translate.encoder.update(num_steps=2, batch_size=16, warmup_steps=1, checkpoint_every=2)
  # Seconds-long evaluation: one batch of 40 samples per row, a 40-step classifier.
  c.eval.update(num_samples=40, batch_size=40, w_values=(0.0, 1.0), teacher_steps=(8,),
                teacher_ddim_steps=(1, 2), classifier_steps=40, classifier_batch_size=64,
                reference_examples=2000, grid_per_class=2)
  return c
