"""The embedded dataset's autoencoder (the codec of configs/fashion_mnist_latent.py):
28x28x1 images <-> 7x7x4 latents, KL-regularised, trained by

  python -m gdistill.autoencoder --config=configs/fashion_mnist_autoencoder.py --workdir=runs/ae

It writes runs/ae/autoencoder.msgpack (+ .json: latent scale and shift, reconstruction
RMSE and FID); the shipped gdistill/weights/fashion_mnist_autoencoder.msgpack is that file.
"""

import ml_collections

from gdistill.config_base import base_config


def get_config():
  c = base_config()
  c.stages = ()
  c.data.name = 'fashion_mnist'
  c.autoencoder = ml_collections.ConfigDict(dict(
      ch=32, ch_mult=(1, 2), num_res_blocks=1, latent_ch=4, out_ch=1,
      # Stable Diffusion's weight of the KL term against the summed squared error: the
      # latents stay close to a plain autoencoder's, with a bounded scale.
      kl_weight=1e-6,
      num_steps=3000, batch_size=64, learning_rate=1e-3, warmup_steps=100, lr_decay='linear',
      grad_clip=1.0, ema_decay=0.0, checkpoint_every=500,
      scale_images=5000))  # training images whose latents set the scale and shift
  # Reconstructions are scored in the evaluation's features (gdistill's classifier).
  c.eval.update(classifier_path='gdistill/weights/fashion_mnist_classifier.npz',
                num_samples=1000)
  return c
