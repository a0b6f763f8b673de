"""Functional ops, each autograd-aware and registered with torch.library (``torch.ops.ssl_fast``)."""
from ssl_fast.ops.additive_attention import additive_attention
from ssl_fast.ops.attention import DecomposedRelPos, RelPosTable, attention, attention_probs
from ssl_fast.ops.conv_projection import BatchNormState, conv_qkv_projection
from ssl_fast.ops.dino_loss import dino_loss, update_center_
from ssl_fast.ops.ema import ema_

__all__ = ["additive_attention", "BatchNormState", "conv_qkv_projection", "DecomposedRelPos", "RelPosTable", "attention", "attention_probs", "dino_loss", "ema_",
           "update_center_"]
