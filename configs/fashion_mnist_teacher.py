"""Trains the embedded default's teacher from scratch (what ships in gdistill/weights/).

The embedded default (configs/fashion_mnist.py) distils the shipped teacher
gdistill/weights/fashion_mnist_teacher.msgpack. This config is how that teacher was
trained: the same U-Net (1.19M parameters), Adam at a constant 4e-4 after 100 warm-up
steps (so the run can be extended: rerun with a larger --config.teacher.num_steps and it
resumes), EMA 0.999, batch 64, with a quick FID (512 samples, 2 x 32 guided DDIM steps,
w = 0 and 1) every 1000 steps in the log and TensorBoard.

  python -m gdistill.main --config=configs/fashion_mnist_teacher.py --workdir=runs/teacher
  python -m gdistill.teacher_file export --workdir=runs/teacher --phase=teacher \\
      --output=gdistill/weights/fashion_mnist_teacher.msgpack

Then distil it: python -m gdistill.main --config=configs/fashion_mnist.py
--workdir=runs/distil --config.teacher_checkpoint=runs/teacher
"""

from gdistill.config_base import config_file


def get_config():
  c = config_file('fashion_mnist.py', relative_to=__file__)
  c.stages = ('teacher',)
  c.teacher_checkpoint = ''
  c.track.enabled = True  # its quick-FID curve (every 1000 steps)
  c.checkpoint.max_to_keep = 40  # every checkpoint, for benchmarks/teacher_curve.py
  c.checkpoint.keep_train_state = True  # so that it can be trained longer
  return c
