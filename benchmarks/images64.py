"""A 64x64x3 array_record dataset (ImageNet 64's image size) for the input-pipeline
benchmark: random PNG images with 1000 classes, written once by TFDS.

Its own module (not the benchmark script) so that Grain's worker processes import the
builder by name instead of re-creating, and re-registering, a pickled copy of it.
"""

import io

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from gdistill import data

IMAGE_64 = (64, 64, 3)


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(image, mode='RGB').save(buffer, format='png')
  return buffer.getvalue()


class LoopBenchImages64(tfds.core.GeneratorBasedBuilder):
  """Random 64x64x3 images (PNG, as imagenet_resized/64x64) with 1000 classes."""

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, num_examples: int = 20000, **kwargs):
    self._num_examples = num_examples
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=IMAGE_64),
            'label': tfds.features.ClassLabel(num_classes=1000)}),
        supervised_keys=('image', 'label'), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(self._num_examples):
      yield i, {'image': _png(rng.integers(0, 256, IMAGE_64, dtype=np.uint8)),
                'label': int(rng.integers(1000))}


def source(data_dir: str, num_examples: int) -> data.ImageSource:
  """Writes the 64x64x3 array_record dataset into ``data_dir``; its train split, read
  by index as any dataset too large for memory is."""
  builder = LoopBenchImages64(num_examples=num_examples, data_dir=data_dir,
                              file_format='array_record')
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(
          try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return data.ImageSource(
      name='loop_bench_images64', split='train', num_examples=num_examples,
      image_shape=IMAGE_64, num_classes=1000, class_names=[str(i) for i in range(1000)],
      data_source=builder.as_data_source(split='train'), in_memory=False)
