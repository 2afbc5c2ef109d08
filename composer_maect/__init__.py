"""MAE-CT (Masked Autoencoder Contrastive Tuning) for MosaicML Composer.

The folders follow the method: ``data`` (MDS conversion, streaming dataset, view pipelines), ``models`` (timm ViT
encoders, the MAE decoder and pre-training model), ``callbacks`` and the training entry point ``train``.
"""

__version__ = '0.1.0'
