"""gdistill's data layer: TFDS image sources (no TensorFlow) and batching."""

from gdistill.data.pipeline import batch_indices
from gdistill.data.pipeline import global_batch
from gdistill.data.pipeline import to_model_input
from gdistill.data.sources import DataError
from gdistill.data.sources import ImageSource
from gdistill.data.sources import open_source

__all__ = [
    'DataError',
    'ImageSource',
    'batch_indices',
    'global_batch',
    'open_source',
    'to_model_input',
]
