"""Trainer, k-NN and linear-probe evaluation, checkpoints and the ``pretrain`` command."""
from ssl_fast.train.config import TrainConfig, resolve_config
from ssl_fast.train.knn import knn_accuracy, knn_predict
from ssl_fast.train.linear_probe import linear_probe_accuracy
from ssl_fast.train.trainer import NonFiniteLossError, Trainer

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer", "knn_accuracy", "knn_predict", "linear_probe_accuracy",
           "resolve_config"]
