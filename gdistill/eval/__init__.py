"""Evaluation: sample-quality metrics (feature networks live in their own modules)."""

from gdistill.eval.metrics import feature_statistics
from gdistill.eval.metrics import frechet_distance
from gdistill.eval.metrics import inception_score
from gdistill.eval.metrics import precision_recall
from gdistill.eval.metrics import quantize_uint8

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "precision_recall",
    "quantize_uint8",
]
