"""The embedded default: Fashion-MNIST (offline, from Debian's dataset-fashion-mnist).

Sized for a 2-core CPU: the whole pipeline (teacher, stage 1, six halvings
64 -> 1 steps) runs in under an hour.

  python -m gdistill.main --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist
"""

from gdistill.config_base import base_config


def get_config():
  c = base_config()
  c.stages = ('teacher', 'stage1', 'stage2')
  c.data.name = 'fashion_mnist'
  c.model.size = 'fmnist'
  c.teacher.num_steps = 8000
  c.teacher.batch_size = 64
  c.teacher.checkpoint_every = 500
  c.stage1.num_steps = 1500
  c.stage1.batch_size = 64
  c.stage2.num_steps = 600
  c.stage2.batch_size = 64
  c.stage2.start_steps = 64
  c.stage2.min_steps = 1
  return c
