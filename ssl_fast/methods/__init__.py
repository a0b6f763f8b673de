"""Self-supervised methods behind one interface (:class:`SSLMethod`) and a registry."""
from ssl_fast.methods.base import (Batch, MethodContext, OptimConfig, SSLMethod, create_method, get_method,
                                   list_methods, register_method)
from ssl_fast.methods.dino import DINO, DINOConfig, MultiCropWrapper
from ssl_fast.methods.byol import BYOL, BYOLConfig
from ssl_fast.methods.simsiam import SimSiam, SimSiamConfig
from ssl_fast.methods.care import CARE, CAREConfig
from ssl_fast.methods.cvsa import CVSA, CVSAConfig

__all__ = ["BYOL", "BYOLConfig", "Batch", "CARE", "CAREConfig", "CVSA", "CVSAConfig", "DINO", "DINOConfig", "MethodContext", "MultiCropWrapper", "OptimConfig",
           "SSLMethod", "SimSiam", "SimSiamConfig", "create_method", "get_method", "list_methods", "register_method"]
