"""Drop-in modules built on ssl_fast.ops."""
from ssl_fast.nn.additive_attention import AdditiveAttention
from ssl_fast.nn.attention import Attention
from ssl_fast.nn.bot_attention import BoTAttention
from ssl_fast.nn.byol_loss import BYOLLoss
from ssl_fast.nn.care_loss import CARELoss
from ssl_fast.nn.conv_attention import ConvAttention, CvtSelfAttention
from ssl_fast.nn.dino_block import DINOBlock
from ssl_fast.nn.dino_loss import DINOLoss
from ssl_fast.nn.hf_attention import HFSwinAttention, HFViTAttention
from ssl_fast.nn.multihead_attention import MultiheadAttention
from ssl_fast.nn.rel_pos_attention import RelPosAttention
from ssl_fast.nn.saliency_alignment import SaliencyAlignmentLoss
from ssl_fast.nn.simsiam_loss import SimSiamLoss
from ssl_fast.nn.window_attention import WindowAttention
from ssl_fast.nn.momentum import MomentumTeacher, cosine_momentum, update_momentum

__all__ = ["AdditiveAttention", "Attention", "BoTAttention", "BYOLLoss", "CARELoss", "ConvAttention", "CvtSelfAttention", "DINOBlock", "MultiheadAttention", "RelPosAttention", "SaliencyAlignmentLoss", "SimSiamLoss", "WindowAttention", "DINOLoss", "HFSwinAttention", "HFViTAttention", "MomentumTeacher", "cosine_momentum", "update_momentum"]
