"""Drop-in modules built on ssl_fast.ops."""
from ssl_fast.nn.attention import Attention
from ssl_fast.nn.momentum import MomentumTeacher, cosine_momentum, update_momentum

__all__ = ["Attention", "MomentumTeacher", "cosine_momentum", "update_momentum"]
