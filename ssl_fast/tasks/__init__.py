"""Downstream tasks that are not self-supervised methods (the Show-Attend-Tell captioner).

They share the trainer's checkpointing (:mod:`ssl_fast.train.checkpoint`) and log formats, and
take their encoders from :mod:`ssl_fast.models` or from an ``ssl-fast pretrain`` checkpoint.
"""
