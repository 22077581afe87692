"""Trains the latent teacher of configs/fashion_mnist_latent.py (what ships as
gdistill/weights/fashion_mnist_latent_teacher.msgpack): a guided U-Net on the shipped
autoencoder's 7x7x4 latents, with labels and label dropout, the pixel teacher's recipe.

  python -m gdistill.main --config=configs/fashion_mnist_latent_teacher.py --workdir=runs/lt
  python -m gdistill.teacher_file export --workdir=runs/lt --phase=teacher \\
      --output=gdistill/weights/fashion_mnist_latent_teacher.msgpack
"""

from gdistill.config_base import config_file


def get_config():
  c = config_file('fashion_mnist_latent.py', relative_to=__file__)
  c.stages = ('teacher',)
  c.teacher_checkpoint = ''
  c.checkpoint.max_to_keep = 40
  c.checkpoint.keep_train_state = True  # so that it can be trained longer
  return c
