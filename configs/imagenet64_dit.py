"""Class-conditional ImageNet 64x64 with a DiT-B/2 teacher and students.

configs/imagenet64.py with the U-Net swapped for a Diffusion Transformer (Peebles &
Xie 2023, gdistill/models/dit.py): the same data, batch, stages, precision, FSDP and
evaluation, so the two runs differ in the network.

Why DiT-B/2 and not the paper's headline DiT-XL/2: the DiT paper works on 32x32x4
latents of 256x256 images, where patch 2 gives 256 tokens. Here the DiT sees 64x64x3
pixels, and patch 2 gives 1024 tokens, 4x the sequence (attention 16x). At that length
B/2 (130M parameters) costs 214 GFLOP per image forward (XLA's count at batch 1, 2
FLOPs per multiply-add), close to the U-Net teacher of configs/imagenet64.py (277M
parameters, 190 GFLOP), so distilling it takes the same compute per step as the
U-Net run. XL/2 (675M) costs 1053 GFLOP per image, 5.5x: set
``c.model = dit_model(size='xl2', patch_size=2, hidden_size=1152, depth=28,
num_heads=16, remat=True)`` where that budget exists.

The DiT's own recipe where it differs from the U-Net's: learning rate 1e-4 (DiT's
AdamW at 1e-4; transformers diverge more readily than the U-Net at 3e-4) and no
dropout. Needs TFDS ``imagenet_resized/64x64`` prepared in array_record format and a
TPU pod slice or GPUs (see launch/README.md).

  python -m gdistill.main --config=configs/imagenet64_dit.py \
      --workdir=gs://BUCKET/imagenet64_dit \
      --config.eval.inception_weights=PATH/pt_inception-2015-12-05.pth

The 'eval' stage needs the FID Inception-v3 weights as configs/imagenet64.py does.
"""

from gdistill.config_base import config_file, dit_model


def get_config():
  # Everything but the network and its learning rate: the U-Net run's.
  c = config_file('imagenet64.py', relative_to=__file__)
  # remat: at 1024 tokens a block's attention probabilities alone are 12 heads x 1024^2
  # values per image; with remat the backward pass keeps only each block's input.
  c.model = dit_model(size='b2', patch_size=2, hidden_size=768, depth=12, num_heads=12,
                      mlp_ratio=4.0, dropout=0.0, remat=True)
  c.teacher.learning_rate = 1e-4
  return c
