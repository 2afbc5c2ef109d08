"""Evaluations of frozen encoders: pooled feature extraction and weighted k-NN classification."""

from composer_maect.evaluation.features import extract_features
from composer_maect.evaluation.knn import MIN_TEMPERATURE, knn_accuracy, knn_predict

__all__ = ['MIN_TEMPERATURE', 'extract_features', 'knn_accuracy', 'knn_predict']
