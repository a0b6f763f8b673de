"""Triton kernels of ssl_fast, one file per op (installed as ``ssl_fast.kernels``)."""
