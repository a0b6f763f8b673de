"""Rules for torch's own modules: ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``)."""
from typing import Optional

from torch import nn

from ssl_fast.nn.multihead_attention import MultiheadAttention
from ssl_fast.patch.checks import Unsupported, _cls, adopt, finish, unexpected_state


def _match_torch_mha(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention)


def _convert_torch_mha(m: nn.Module) -> nn.Module:
    if type(m).forward is not nn.MultiheadAttention.forward:
        raise Unsupported(f"subclass {_cls(m)} overrides forward")
    if (m.bias_k is None) != (m.bias_v is None):
        raise Unsupported("only one of bias_k/bias_v is set")
    extra = unexpected_state(m, children=("out_proj",),
                        params=("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                                "in_proj_bias", "bias_k", "bias_v"))
    if extra:
        raise Unsupported(f"extra state {extra}")
    new = MultiheadAttention(m.embed_dim, m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
                             add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn,
                             kdim=m.kdim, vdim=m.vdim, batch_first=m.batch_first, device="meta")
    if new._qkv_same_embed_dim != m._qkv_same_embed_dim:
        raise Unsupported("projection layout (_qkv_same_embed_dim) differs from kdim/vdim")
    adopt(new, m, ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                    "bias_k", "bias_v", "out_proj"])
    return finish(new, m)


def _note_torch_mha(m: nn.Module, parent: Optional[nn.Module]) -> Optional[str]:
    if parent is not None and _cls(parent) == "TransformerEncoderLayer":
        return ("TransformerEncoderLayer may run torch's fused encoder kernel (eval mode, no grad, "
                "batch_first, even heads) with the shared weights instead of calling its self_attn; "
                "results are the same. torch.backends.mha.set_fastpath_enabled(False) routes every "
                "call through ssl_fast")
    return None
