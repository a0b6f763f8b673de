"""Trainer, k-NN evaluation, checkpoints and the ``pretrain`` command."""
from ssl_fast.train.knn import knn_accuracy, knn_predict
from ssl_fast.train.trainer import PRESETS, NonFiniteLossError, TrainConfig, Trainer

__all__ = ["NonFiniteLossError", "PRESETS", "TrainConfig", "Trainer", "knn_accuracy", "knn_predict"]
