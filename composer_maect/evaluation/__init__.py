"""Evaluations of frozen encoders: feature extraction, k-NN, linear probes, k-means clustering, low-shot and plots."""

from composer_maect.evaluation.clustering import cluster_accuracy, kmeans_clustering
from composer_maect.evaluation.features import extract_features
from composer_maect.evaluation.knn import MIN_TEMPERATURE, knn_accuracy, knn_predict
from composer_maect.evaluation.linear_probe import DEFAULT_PROBE_LRS, LinearProbeResult, train_linear_probes
from composer_maect.evaluation.lowshot import lowshot_logistic_regression, percent_split, shots_per_class_split
from composer_maect.evaluation.plots import plot_confusion_matrix, plot_tsne

__all__ = [
    'DEFAULT_PROBE_LRS',
    'MIN_TEMPERATURE',
    'LinearProbeResult',
    'cluster_accuracy',
    'extract_features',
    'kmeans_clustering',
    'knn_accuracy',
    'knn_predict',
    'lowshot_logistic_regression',
    'percent_split',
    'plot_confusion_matrix',
    'plot_tsne',
    'shots_per_class_split',
    'train_linear_probes',
]
