"""Functional ops, each autograd-aware and registered with torch.library (``torch.ops.ssl_fast``)."""
from ssl_fast.ops.attention import DecomposedRelPos, RelPosTable, attention, attention_probs
from ssl_fast.ops.ema import ema_

__all__ = ["DecomposedRelPos", "RelPosTable", "attention", "attention_probs", "ema_"]
