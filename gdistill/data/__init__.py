"""gdistill's data layer: TFDS image sources (no TensorFlow) and the Grain
training pipeline."""

from gdistill.data.pipeline import AUTO_WORKERS
from gdistill.data.pipeline import num_workers
from gdistill.data.pipeline import to_model_input
from gdistill.data.pipeline import train_batches
from gdistill.data.sources import DataError
from gdistill.data.sources import ImageSource
from gdistill.data.sources import open_source

__all__ = [
    'AUTO_WORKERS',
    'DataError',
    'ImageSource',
    'num_workers',
    'open_source',
    'to_model_input',
    'train_batches',
]
