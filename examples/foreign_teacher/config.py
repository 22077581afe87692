"""Distil the foreign DiT teacher (examples/foreign_teacher) with gdistill's stock pipeline.

The teacher comes from ``factory.make_teacher`` (teacher.source): another codebase's DiT
(NCHW, integer timesteps on a linear-beta DDPM table, eps-prediction, null label 0), whose
student gets w through a zero-initialised embedding added to its ``TimestepEmbedder_0``.
The recipe is the embedded default's (configs/fashion_mnist.py): stage 1, halvings 64 -> 1
on the table's nested grid, the evaluation (the teacher's rows sampled here: no shipped
measurement for this teacher) and translation.

  python -m gdistill.main --config=examples/foreign_teacher/config.py --workdir=runs/foreign
"""

from gdistill.config_base import config_file


def get_config():
  c = config_file('../../configs/fashion_mnist.py', relative_to=__file__)
  c.stages = ('stage1', 'stage2', 'eval', 'translate')
  c.teacher.source = 'python:examples.foreign_teacher.factory:make_teacher'
  c.teacher_checkpoint = ''
  c.eval.teacher_rows = ''  # the shipped rows are the U-Net teacher's: sample this one's
  # An eps-prediction network's x_hat = (z - sigma eps_hat) / alpha is ill-conditioned near
  # t = 1 (alpha(1) = 0.0064 on this table): an x-space loss weighted max(SNR, 1) there is
  # (sigma / alpha)^2 = 24000 times its eps error, drowns every other time and saturates the
  # gradient clip. 'snr' weights it as eps-MSE, the authors' stage-1 loss.
  for section in (c.stage1, c.stage2, c.translate.encoder):
    section.weighting = 'snr'
  return c
