"""Drop-in for ``torch.nn.MultiheadAttention`` on :func:`ssl_fast.ops.attention`."""
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ssl_fast.ops.attention import attention, attention_probs


class MultiheadAttention(nn.Module):
    """Multi-head attention with the constructor, parameters and forward of ``torch.nn.MultiheadAttention``.

    Parameter names follow torch (``in_proj_weight`` or ``q_proj_weight``/``k_proj_weight``/
    ``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``, ``in_proj_bias``,
    ``bias_k``/``bias_v``, ``out_proj``), so state dicts load both ways. The module also exposes
    ``merge_masks``, ``_qkv_same_embed_dim`` and ``head_dim``, which torch's
    ``TransformerEncoderLayer`` reads.

    Shapes (``L`` queries, ``S`` keys, ``N`` batch, ``E = embed_dim``):
    ``query [L, N, E]`` (``[N, L, E]`` with ``batch_first``, ``[L, E]`` unbatched),
    ``key [S, N, kdim]``, ``value [S, N, vdim]``; output as ``query``; weights ``[N, L, S]``
    (averaged) or ``[N, num_heads, L, S]``, without ``N`` for unbatched input.

    Masks use torch's convention: a boolean ``True`` means "may NOT attend" (the opposite of
    SDPA and of :func:`ssl_fast.ops.attention`); float masks are added to the logits.

    Difference from torch: a query whose every key is masked gets a zero output and zero
    weights (torch returns NaN on its ``need_weights=True`` path).

    Args:
        embed_dim: model width ``E``.
        num_heads: number of heads (must divide ``embed_dim``).
        dropout: dropout on the attention probabilities (training only).
        bias: bias in the input and output projections.
        add_bias_kv: append a learned key and value (``bias_k``, ``bias_v``) to every sequence.
        add_zero_attn: append an all-zero key and value to every sequence.
        kdim: key width (default ``embed_dim``).
        vdim: value width (default ``embed_dim``).
        batch_first: inputs and outputs are ``[N, L, E]`` instead of ``[L, N, E]``.
        device: parameter device.
        dtype: parameter dtype.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be positive, got embed_dim={embed_dim}, "
                             f"num_heads={num_heads}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **dd))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **dd))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **dd))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **dd))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **dd))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **dd)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **dd))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **dd))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch's initialisation: Xavier-uniform projections, zero biases, Xavier-normal bias_k/v."""
        if self.in_proj_weight is not None:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        for b in (self.bias_k, self.bias_v):
            if b is not None:
                nn.init.xavier_normal_(b)

    # ----------------------------------------------------------------------------------------
    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """Batch-first inputs -> ``q [N, H, L, hd]``, ``k``/``v [N, H, S', hd]`` (``S'`` counts
        the appended ``bias_k`` and zero keys)."""
        n, l, _ = query.shape
        e = self.embed_dim
        bias = self.in_proj_bias
        b_q = b_k = b_v = None
        if bias is not None:
            b_q, b_k, b_v = bias.chunk(3)
        if self._qkv_same_embed_dim:
            if query is key and key is value:
                q, k, v = F.linear(query, self.in_proj_weight, bias).chunk(3, dim=-1)
            else:
                w_q, w_k, w_v = self.in_proj_weight.chunk(3)
                q = F.linear(query, w_q, b_q)
                k = F.linear(key, w_k, b_k)
                v = F.linear(value, w_v, b_v)
        else:
            q = F.linear(query, self.q_proj_weight, b_q)
            k = F.linear(key, self.k_proj_weight, b_k)
            v = F.linear(value, self.v_proj_weight, b_v)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.reshape(1, 1, e).expand(n, 1, e)], dim=1)
            v = torch.cat([v, self.bias_v.reshape(1, 1, e).expand(n, 1, e)], dim=1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, 1, e)], dim=1)
            v = torch.cat([v, v.new_zeros(n, 1, e)], dim=1)
        h, hd = self.num_heads, self.head_dim
        q = q.reshape(n, l, h, hd).transpose(1, 2)
        k = k.reshape(n, k.shape[1], h, hd).transpose(1, 2)
        v = v.reshape(n, v.shape[1], h, hd).transpose(1, 2)
        return q, k, v

    def _mask(self, attn_mask, key_padding_mask, n: int, l: int, s: int, s_ext: int,
              dtype: torch.dtype, device: torch.device, causal: bool) -> Optional[torch.Tensor]:
        """torch-convention masks -> one mask for the op (``True`` = attend, or additive), shape
        broadcastable to ``[N, H, L, S']``."""
        extra = s_ext - s
        masks = []
        if causal:
            masks.append(~torch.ones(l, s_ext, dtype=torch.bool, device=device).tril())
        elif attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (l, s):
                    raise ValueError(f"2-D attn_mask must have shape (L, S) = {(l, s)}, got "
                                     f"{tuple(attn_mask.shape)}")
                m = attn_mask
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (n * self.num_heads, l, s):
                    raise ValueError(f"3-D attn_mask must have shape (N * num_heads, L, S) = "
                                     f"{(n * self.num_heads, l, s)}, got {tuple(attn_mask.shape)}")
                m = attn_mask.reshape(n, self.num_heads, l, s)
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D")
            masks.append(F.pad(m, (0, extra)) if extra else m)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (n, s):
                raise ValueError(f"key_padding_mask must have shape (N, S) = {(n, s)}, got "
                                 f"{tuple(key_padding_mask.shape)}")
            m = key_padding_mask.reshape(n, 1, 1, s)
            masks.append(F.pad(m, (0, extra)) if extra else m)
        for m in masks:
            if m.dtype != torch.bool and not m.is_floating_point():
                raise ValueError(f"masks must be bool or floating, got {m.dtype}")
        if not masks:
            return None
        if all(m.dtype == torch.bool for m in masks):
            blocked = masks[0]
            for m in masks[1:]:
                blocked = blocked | m
            return ~blocked  # SDPA convention for the op: True = attend
        total = None
        for m in masks:
            if m.dtype == torch.bool:
                m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
            total = m if total is None else total + m
        return total

    def _batch_first(self, query, key, value, key_padding_mask, attn_mask):
        """Validate shapes and return batch-first 3-D tensors and whether the input was batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if query.dim() == 3:
            if key.dim() != 3 or value.dim() != 3:
                raise ValueError(f"batched (3-D) query needs 3-D key and value, got {key.dim()}-D and "
                                 f"{value.dim()}-D")
            if key_padding_mask is not None and key_padding_mask.dim() != 2:
                raise ValueError(f"batched query needs a 2-D key_padding_mask, got {key_padding_mask.dim()}-D")
            if self.batch_first:
                return query, key, value, key_padding_mask, True
            return query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), key_padding_mask, True
        if query.dim() == 2:
            if key.dim() != 2 or value.dim() != 2:
                raise ValueError(f"unbatched (2-D) query needs 2-D key and value, got {key.dim()}-D and "
                                 f"{value.dim()}-D")
            if key_padding_mask is not None:
                if key_padding_mask.dim() != 1:
                    raise ValueError(f"unbatched query needs a 1-D key_padding_mask, got "
                                     f"{key_padding_mask.dim()}-D")
                key_padding_mask = key_padding_mask.unsqueeze(0)
            return query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), key_padding_mask, False
        raise ValueError(f"query must be 2-D (unbatched) or 3-D (batched), got {query.dim()}-D")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attention of ``query`` over ``key``/``value`` (see the class docstring for shapes).

        Args:
            query: ``[L, N, E]`` (``[N, L, E]`` with ``batch_first``; ``[L, E]`` unbatched).
            key: ``[S, N, kdim]`` (or batch-first / unbatched likewise).
            value: ``[S, N, vdim]``.
            key_padding_mask: ``[N, S]`` (``[S]`` unbatched); bool ``True`` = padding, or additive float.
            need_weights: also return the attention weights (slower: they are materialised).
            attn_mask: ``[L, S]`` or ``[N * num_heads, L, S]``; bool ``True`` = blocked, or additive.
            average_attn_weights: average the returned weights over heads.
            is_causal: hint that ``attn_mask`` is the causal mask (``attn_mask`` must still be
                given, as in torch); without ``key_padding_mask`` and ``need_weights`` a causal
                mask is used in place of ``attn_mask``.

        Returns:
            ``(output, weights)``; ``weights`` is ``None`` when ``need_weights=False``. The
            weights are those the output was computed with (after dropout in training).
        """
        if query.is_nested or key.is_nested or value.is_nested:
            return self._forward_nested(query, key, value, key_padding_mask, need_weights, attn_mask)
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True needs attn_mask (torch's convention: is_causal is a hint "
                             "that attn_mask is causal); pass nn.Transformer.generate_square_subsequent_mask")
        q_in, k_in, v_in, kpm, batched = self._batch_first(query, key, value, key_padding_mask, attn_mask)
        if q_in.shape[-1] != self.embed_dim:
            raise ValueError(f"query has {q_in.shape[-1]} features, expected embed_dim={self.embed_dim}")
        if k_in.shape[:2] != v_in.shape[:2] or k_in.shape[0] != q_in.shape[0]:
            raise ValueError(f"query, key and value disagree on batch or key count: "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if key is query and value is query:
            k_in = v_in = q_in  # keep identity so self-attention takes the packed projection
        n, l, _ = q_in.shape
        s = k_in.shape[1]
        if attn_mask is not None and not batched and attn_mask.dim() == 3 and attn_mask.shape[0] != self.num_heads:
            raise ValueError(f"unbatched 3-D attn_mask must be (num_heads, L, S), got {tuple(attn_mask.shape)}")
        q, k, v = self._project(q_in, k_in, v_in)
        causal = is_causal and kpm is None and not need_weights
        mask = self._mask(attn_mask, kpm, n, l, s, k.shape[2], q.dtype, q.device, causal)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            # one op call returns both softmax(.) v and softmax(.) itself (v extended by an
            # identity), so the weights are exactly those used for the output, dropout included
            s_ext = k.shape[2]
            eye = torch.eye(s_ext, dtype=v.dtype, device=v.device).expand(n, self.num_heads, s_ext, s_ext)
            both = attention(q, k, torch.cat([v, eye], dim=-1), attn_mask=mask, dropout_p=p)
            out, weights = both[..., :self.head_dim], both[..., self.head_dim:]
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(n, l, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _forward_nested(self, query, key, value, key_padding_mask, need_weights, attn_mask):
        """Nested (ragged) batch-first self-attention, as torch's encoder fast path may pass."""
        if need_weights or key_padding_mask is not None or attn_mask is not None:
            raise ValueError("nested-tensor input is supported only with need_weights=False and no masks")
        if not self.batch_first:
            raise ValueError("nested-tensor input needs batch_first=True")
        seqs = [query.unbind(), key.unbind(), value.unbind()]
        lengths = [t.shape[0] for t in seqs[1]]
        pad = [torch.nn.utils.rnn.pad_sequence(list(x), batch_first=True) for x in seqs]
        kpm = torch.arange(pad[1].shape[1], device=pad[1].device)[None, :] >= torch.tensor(
            lengths, device=pad[1].device)[:, None]
        out, _ = self.forward(pad[0], pad[1], pad[2], key_padding_mask=kpm, need_weights=False)
        return torch.nested.as_nested_tensor([out[i, :t.shape[0]] for i, t in enumerate(seqs[0])]), None

    def merge_masks(self, attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                    query: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[int]]:
        """torch's mask merge for its fused encoder-layer path (same semantics and return value).

        Returns ``(mask, type)``: ``(key_padding_mask, 1)``, ``(attn_mask [N, H, L, L], 2)``,
        their sum expanded to ``[N, H, L, L]`` (type 2), or ``(None, None)``.
        """
        if attn_mask is None:
            return (key_padding_mask, 1) if key_padding_mask is not None else (None, None)
        n, l, _ = query.shape
        if attn_mask.dim() == 3:
            merged = attn_mask.view(n, -1, l, l)
        else:
            merged = attn_mask.view(1, 1, l, l).expand(n, self.num_heads, l, l)
        if key_padding_mask is not None:
            merged = merged + key_padding_mask.view(n, 1, 1, l).expand(-1, self.num_heads, -1, -1)
        return merged, 2

    def attention_map(self, query: torch.Tensor, key: Optional[torch.Tensor] = None,
                      key_padding_mask: Optional[torch.Tensor] = None,
                      attn_mask: Optional[torch.Tensor] = None, query_index=None) -> torch.Tensor:
        """Per-head attention probabilities of chosen queries, for visualisation (no gradient).

        Args:
            query: as in :meth:`forward`.
            key: as in :meth:`forward`; default ``query`` (self-attention).
            key_padding_mask: as in :meth:`forward`.
            attn_mask: as in :meth:`forward`.
            query_index: queries to return (int, list, slice or 1-D tensor); ``None``: all.

        Returns:
            ``[N, num_heads, Lq, S']`` float32 (``[num_heads, Lq, S']`` unbatched), where ``S'``
            counts the ``bias_k`` and zero keys when the module adds them.
        """
        key = query if key is None else key
        with torch.no_grad():
            q_in, k_in, _, kpm, batched = self._batch_first(query, key, key, key_padding_mask, attn_mask)
            if self.vdim != self.kdim:
                # value width differs from key width: project a zero value of the right width
                v_in = k_in.new_zeros(k_in.shape[0], k_in.shape[1], self.vdim)
            else:
                v_in = k_in
            q, k, _ = self._project(q_in, k_in, v_in)
            n, l, _ = q_in.shape
            mask = self._mask(attn_mask, kpm, n, l, k_in.shape[1], k.shape[2], q.dtype, q.device, False)
            probs = attention_probs(q, k, attn_mask=mask, query_index=query_index)
        return probs if batched else probs.squeeze(0)
