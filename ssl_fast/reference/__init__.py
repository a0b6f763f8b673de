"""Plain-PyTorch definitions of every op: the truth for the tests and the always-available backend."""
from ssl_fast.reference.additive_attention import additive_attention

__all__ = ["additive_attention"]
