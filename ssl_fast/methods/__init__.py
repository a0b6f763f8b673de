"""Self-supervised methods behind one interface (:class:`SSLMethod`) and a registry."""
from ssl_fast.methods.base import (Batch, MethodContext, OptimConfig, SSLMethod, create_method, get_method,
                                   list_methods, register_method)
from ssl_fast.methods.dino import DINO, MultiCropWrapper

__all__ = ["Batch", "DINO", "MethodContext", "MultiCropWrapper", "OptimConfig", "SSLMethod", "create_method",
           "get_method", "list_methods", "register_method"]
