"""Drop-ins for Hugging Face transformers' ViT-family and Swin self-attention, on :func:`ssl_fast.ops.attention`.

transformers 5 builds ViT, DeiT, DINOv2 (with and without registers) and Swin attention as one
module each (``ViTAttention``, ``DeiTAttention``, ``Dinov2Attention``,
``Dinov2WithRegistersAttention``, ``SwinAttention``): ``q_proj``, ``k_proj``, ``v_proj``,
``o_proj`` (and Swin's ``relative_position_bias``), ``forward(hidden_states, attention_mask=None,
**kwargs) -> (attn_output, attn_weights)``, with the attention itself done by the function
``config._attn_implementation`` names (``"eager"``, ``"sdpa"``, ``"flex_attention"``, ...).

* :class:`HFViTAttention`: ``softmax(scaling * q k^T + mask) v`` per head, then ``o_proj``.
* :class:`HFSwinAttention`: the same inside each window, plus Swin's relative-position bias
  (gathered in the kernel from ``relative_position_bias.relative_position_bias_table``, never as an
  ``[H, N, N]`` tensor) and the shifted-window mask.

What the forward returns, by implementation (the unpatched module's contract, kept exactly):

* ``"sdpa"``: ``(attn_output, None)``, through the fused op.
* ``"eager"``: Hugging Face returns the attention probabilities as ``attn_weights``. Its layers
  drop them; they reach the user only through ``output_attentions=True`` (which Hugging Face
  records while the model's forward runs) or a forward hook on the module. In those two cases the
  module runs Hugging Face's own computation and returns them exactly (gradients included);
  otherwise it runs the fused op and returns ``(attn_output, None)``. :meth:`HFViTAttention.attention_map`
  gives the probabilities on request, as ssl_fast's other drop-ins do.
* anything else (``"flex_attention"``, flash attention, a function registered by the user, or an
  ``"eager"``/``"sdpa"`` entry the user replaced), extra keyword arguments other than
  ``output_attentions``/``output_hidden_states``, a mask the op does not take (not a tensor,
  needing a gradient, a query row with every key masked) or an input of another layout: Hugging
  Face's own computation, unchanged.

Attention dropout (``attention_dropout > 0`` in training) is applied by the op with the same
probability, from its own random stream.

``ssl_fast.patch`` gives a replaced module the class :func:`hf_drop_in_class` builds: the drop-in
first (its forward), then the Hugging Face class it replaces, so Hugging Face's ``isinstance``
checks (``output_attentions`` recording, weight initialisation) still find it and the exact
computation above is Hugging Face's forward itself. Standing alone, the drop-ins compute it with
the attention function transformers registers under ``config._attn_implementation`` and, for
``"eager"``, the same arithmetic as Hugging Face's ``eager_attention_forward``.
"""
import sys
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ssl_fast.ops.attention import RelPosTable, attention, attention_probs
from ssl_fast.reference.attention import window_relative_index

# keyword arguments Hugging Face's layers pass down that no attention function reads
_PASSIVE_KWARGS = frozenset({"output_attentions", "output_hidden_states"})
_EAGER = object()  # get_interface's default: "eager" not overridden by the user


def _served_implementation(config) -> Optional[str]:
    """``"eager"`` or ``"sdpa"`` when ``config._attn_implementation`` selects Hugging Face's own
    function of that name (so the fused op computes what it would), else ``None``."""
    impl = getattr(config, "_attn_implementation", None)
    if impl is None:
        impl = "eager"  # get_interface(None, eager_attention_forward) gives the module's eager function
    if impl not in ("eager", "sdpa"):
        return None
    utils = sys.modules.get("transformers.modeling_utils")
    if utils is None:  # transformers not loaded: a standalone module with a plain config
        return impl
    functions = getattr(utils, "ALL_ATTENTION_FUNCTIONS", None)
    if functions is None:
        return None
    try:
        fn = functions.get_interface(impl, _EAGER)
    except (KeyError, ValueError):
        return None
    if impl == "eager":
        return "eager" if fn is _EAGER else None
    sdpa = sys.modules.get("transformers.integrations.sdpa_attention")
    return "sdpa" if sdpa is not None and fn is getattr(sdpa, "sdpa_attention_forward", None) else None


def _is_hf_capture_hook(hook) -> bool:
    """Hugging Face's ``output_attentions``/``output_hidden_states`` recording hook."""
    return (getattr(hook, "__module__", "") == "transformers.utils.output_capturing"
            and getattr(hook, "__name__", "") == "output_capturing_hook")


def _weights_observed(module: nn.Module) -> bool:
    """Whether the attention probabilities of this forward can reach anyone: Hugging Face is
    recording ``attentions`` (``output_attentions=True``), or a forward hook other than Hugging
    Face's recording hook sits on the module."""
    capturing = sys.modules.get("transformers.utils.output_capturing")
    if capturing is not None:
        collector = getattr(capturing, "_active_collector", None)
        if collector is None:
            return True  # another transformers: cannot tell, so assume they are wanted
        collected = collector.get()
        if collected is not None and "attentions" in collected:
            return True
    return any(not _is_hf_capture_hook(h) for h in module._forward_hooks.values())


def _mask_servable(mask: Optional[torch.Tensor], shape: Tuple[int, int, int, int], like: torch.Tensor) -> bool:
    """Whether :func:`ssl_fast.ops.attention` computes exactly what Hugging Face's eager and SDPA
    functions do with ``mask`` for logits of ``shape = [B, H, Nq, Nk]``: a boolean (True = attend)
    or additive float tensor broadcastable to it, on ``like``'s device, needing no gradient, and
    leaving every query at least one key (a fully masked row is uniform in eager, NaN in SDPA and
    zero in the op). Masked float entries are Hugging Face's ``finfo(dtype).min`` or ``-inf``.
    The row check reads the mask once (a host synchronisation, only when a mask is given)."""
    if mask is None:
        return True
    if not isinstance(mask, torch.Tensor) or mask.dim() > 4 or mask.device != like.device or mask.requires_grad:
        return False
    if mask.dtype != torch.bool and not mask.is_floating_point():
        return False
    try:
        torch.broadcast_shapes(mask.shape, shape)
    except RuntimeError:
        return False
    live = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return bool(live.any(-1).all())


def _hf_forward(module: nn.Module, drop_in: type):
    """The forward of the Hugging Face class after ``drop_in`` in ``module``'s class hierarchy
    (see :func:`hf_drop_in_class`), or ``None`` for a standalone drop-in."""
    mro = type(module).__mro__
    for cls in mro[mro.index(drop_in) + 1:]:
        if cls is nn.Module:
            return None
        if "forward" in vars(cls):
            return vars(cls)["forward"]
    return None


def _eager_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Hugging Face's ``eager_attention_forward`` (ViT/DeiT/Swin): ``[B, H, N, D]`` q, k, v ->
    ``([B, N, H, D]`` output, ``[B, H, N, N]`` probabilities after dropout)."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _attention_function(config):
    """What Hugging Face calls for ``config._attn_implementation`` (the module's eager function by
    default), for a standalone drop-in."""
    impl = getattr(config, "_attn_implementation", None)
    if impl is None or impl == "eager":
        utils = sys.modules.get("transformers.modeling_utils")
        if utils is None:
            return _eager_attention
        return utils.ALL_ATTENTION_FUNCTIONS.get_interface("eager", _eager_attention)
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError as exc:
        raise ValueError(f"config._attn_implementation={impl!r} needs transformers, which cannot be "
                         f"imported ({exc}); use 'eager' or 'sdpa'") from exc
    return ALL_ATTENTION_FUNCTIONS.get_interface(impl, _eager_attention)


class _HFAttentionBase(nn.Module):
    """What the two drop-ins share: projections, the choice between the fused op and Hugging
    Face's own computation, and the attributes Hugging Face reads (``config``,
    ``num_attention_heads``, ``head_dim``, ``attention_dropout``, ``scaling``, ``is_causal``)."""

    def _init_common(self, config, hidden_size: int, num_heads: int, head_dim: Optional[int], device, dtype) -> None:
        nn.Module.__init__(self)  # not super(): in a hf_drop_in_class the next class is Hugging Face's
        for name, value in (("hidden_size", hidden_size), ("num_attention_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}")
            head_dim = hidden_size // num_heads
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        dropout = float(getattr(config, "attention_probs_dropout_prob", 0.0))
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"config.attention_probs_dropout_prob must be in [0, 1), got {dropout}")
        f = dict(device=device, dtype=dtype)
        self.config = config
        self.num_attention_heads = num_heads
        self.head_dim = head_dim
        self.attention_dropout = dropout
        self.scaling = head_dim ** -0.5
        self.is_causal = False
        bias = bool(getattr(config, "qkv_bias", True))
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, inner, bias=bias, **f)
        self.k_proj = nn.Linear(hidden_size, inner, bias=bias, **f)
        self.v_proj = nn.Linear(hidden_size, inner, bias=bias, **f)
        self.o_proj = nn.Linear(inner, hidden_size, bias=True, **f)

    def _heads(self, hidden_states: torch.Tensor):
        """``[B, N, C]`` -> q, k, v ``[B, H, N, head_dim]`` (Hugging Face's reshape)."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        return tuple(p(hidden_states).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))

    def _merge(self, out: torch.Tensor, input_shape) -> torch.Tensor:
        """``[B, H, N, head_dim]`` -> ``o_proj`` of ``[B, N, H * head_dim]``."""
        return self.o_proj(out.transpose(1, 2).reshape(*input_shape, -1))

    def _fusable(self, hidden_states: torch.Tensor, kwargs: dict) -> bool:
        """The checks both drop-ins make before the fused path (masks are checked by each)."""
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
            return False
        if any(k not in _PASSIVE_KWARGS for k in kwargs) or self.is_causal:
            return False
        if not hidden_states.is_floating_point():
            return False
        impl = _served_implementation(self.config)
        if impl is None:
            return False
        return not (impl == "eager" and _weights_observed(self))

    def _dropout_p(self) -> float:
        return float(self.attention_dropout) if self.training else 0.0


class HFViTAttention(_HFAttentionBase):
    """Drop-in for Hugging Face transformers' ``ViTAttention`` (also ``DeiTAttention``,
    ``Dinov2Attention``, ``Dinov2WithRegistersAttention``: the same module).

    For tokens ``x [B, N, C]``: ``q, k, v = x W_q^T + b_q, ...`` split into ``H`` heads of
    ``head_dim``; ``out_h = softmax(scaling * q_h k_h^T + mask) v_h`` (``scaling = head_dim ** -0.5``)
    through :func:`ssl_fast.ops.attention`; heads merged and ``o_proj``. Same constructor,
    parameter names (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), attributes and forward as
    Hugging Face's, so state dicts load both ways; see the module docstring for what the forward
    returns under each ``config._attn_implementation``.

    Args:
        config: a ViT/DeiT/DINOv2 config: ``hidden_size``, ``num_attention_heads``, optional
            ``head_dim``, ``attention_probs_dropout_prob``, ``qkv_bias``, ``_attn_implementation``.
        device, dtype: for the parameters (not in Hugging Face's constructor; keyword only).
    """

    def __init__(self, config, *, device=None, dtype=None):
        self._init_common(config, config.hidden_size, config.num_attention_heads, getattr(config, "head_dim", None),
                          device, dtype)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Self-attention over ``hidden_states [B, N, C]``.

        Args:
            hidden_states: ``[B, N, hidden_size]`` tokens.
            attention_mask: ``None`` or the mask Hugging Face's model builds (additive float or
                boolean, broadcastable to ``[B, H, N, N]``).
            **kwargs: Hugging Face's ``TransformersKwargs`` (passed on to its attention function
                when the fused path does not run).

        Returns:
            ``(attn_output [B, N, hidden_size], attn_weights)``: ``attn_weights`` is
            ``[B, H, N, N]`` exactly when Hugging Face's own computation ran (see the module
            docstring), else ``None``.
        """
        if self._fusable(hidden_states, kwargs):
            b, n, _ = hidden_states.shape
            q, k, v = self._heads(hidden_states)
            if _mask_servable(attention_mask, (b, q.shape[1], n, n), q):
                out = attention(q, k, v, scale=self.scaling, attn_mask=attention_mask, dropout_p=self._dropout_p())
                return self._merge(out, (b, n)), None
        return self._exact_forward(hidden_states, attention_mask, **kwargs)

    def _exact_forward(self, hidden_states, attention_mask=None, **kwargs):
        """Hugging Face's computation: its forward when this is a :func:`hf_drop_in_class`."""
        hf = _hf_forward(self, HFViTAttention)
        if hf is not None:
            return hf(self, hidden_states, attention_mask, **kwargs)
        q, k, v = self._heads(hidden_states)
        out, weights = _attention_function(self.config)(
            self, q, k, v, attention_mask, dropout=self._dropout_p(), scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights

    @torch.no_grad()
    def attention_map(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                      query_index=None) -> torch.Tensor:
        """Attention probabilities ``[B, H, len(query_index), N]`` (float32 or float64, no gradient)
        for ``hidden_states [B, N, C]``, without dropout; computed on request only."""
        q, k, _ = self._heads(hidden_states)
        return attention_probs(q, k, scale=self.scaling, attn_mask=attention_mask, query_index=query_index)


class SwinRelativePositionBias(nn.Module):
    """Swin's relative-position bias table, as Hugging Face's ``SwinRelativePositionBias`` holds it:
    parameter ``relative_position_bias_table [(2 Wh - 1)(2 Ww - 1), H]`` and the non-persistent
    flat ``relative_position_index [N * N]`` buffer (``N = Wh * Ww``). The drop-in's kernel
    gathers the bias itself; :meth:`forward` returns the ``[1, H, N, N]`` bias as Hugging Face's does."""

    def __init__(self, num_heads: int, window_size: Tuple[int, int], device=None, dtype=None):
        super().__init__()
        self.window_size = (int(window_size[0]), int(window_size[1]))
        self.window_area = self.window_size[0] * self.window_size[1]
        self.relative_position_bias_table = nn.Parameter(torch.zeros(
            (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1), num_heads, device=device, dtype=dtype))
        self.relative_position_index = nn.Buffer(
            window_relative_index(self.window_size, device=device).reshape(-1), persistent=False)

    def forward(self) -> torch.Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).contiguous().unsqueeze(0)


def _standard_index(rpb: nn.Module) -> bool:
    """Whether ``rpb.relative_position_index`` is Swin's index for ``rpb.window_size`` (the one the
    kernel derives from the window size)."""
    idx = getattr(rpb, "relative_position_index", None)
    if not isinstance(idx, torch.Tensor):
        return False
    want = window_relative_index(rpb.window_size, device=idx.device).reshape(-1)
    return idx.shape == want.shape and bool(torch.equal(idx.long(), want))


class HFSwinAttention(_HFAttentionBase):
    """Drop-in for Hugging Face transformers' ``SwinAttention`` (window attention with a
    relative-position bias table).

    For windows ``x [B * nW, N, C]`` of ``N = Wh * Ww`` tokens in row-major order:
    ``out_h = softmax(scaling * q_h k_h^T + B_h (+ mask[b % nW])) v_h`` with
    ``B_h[i, j] = relative_position_bias_table[index(i, j), h]``,
    ``index(i, j) = (yi - yj + Wh - 1)(2 Ww - 1) + (xi - xj + Ww - 1)``, gathered inside the kernel
    (:class:`ssl_fast.ops.RelPosTable`; no ``[H, N, N]`` bias is built) with the shifted-window
    mask ``[nW, N, N]`` that ``SwinLayer`` passes as ``attention_mask``; heads merged and
    ``o_proj``. Same constructor, parameter names (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
    ``relative_position_bias.relative_position_bias_table``) and forward as Hugging Face's.

    Args:
        config: a Swin config (``attention_probs_dropout_prob``, ``qkv_bias``,
            ``_attn_implementation``).
        hidden_size: channels ``C``.
        num_attention_heads: heads ``H`` (``C`` divisible by it).
        window_size: ``Wh = Ww``.
        device, dtype: for the parameters (keyword only).
    """

    def __init__(self, config, hidden_size: int, num_attention_heads: int, window_size: int, *,
                 device=None, dtype=None):
        self._init_common(config, hidden_size, num_attention_heads, None, device, dtype)
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be a positive int, got {window_size!r}")
        self.relative_position_bias = SwinRelativePositionBias(num_attention_heads, (window_size, window_size),
                                                               device=device, dtype=dtype)
        self._index_checked = None

    def _index_is_standard(self) -> bool:
        """:func:`_standard_index`, remembered per buffer (object and version)."""
        idx = getattr(self.relative_position_bias, "relative_position_index", None)
        key = (id(idx), getattr(idx, "_version", None))
        if self._index_checked is None or self._index_checked[0] != key:
            self._index_checked = (key, _standard_index(self.relative_position_bias))
        return self._index_checked[1]

    def _rel_pos(self, attention_mask: Optional[torch.Tensor]) -> RelPosTable:
        rpb = self.relative_position_bias
        return RelPosTable(rpb.relative_position_bias_table, rpb.window_size, attention_mask)

    def _window_mask_servable(self, mask: Optional[torch.Tensor], like: torch.Tensor) -> bool:
        """The shifted-window mask: additive float ``[nW, N, N]``, ``nW`` dividing the batch of windows."""
        if mask is None:
            return True
        n = like.shape[2]
        return (isinstance(mask, torch.Tensor) and mask.is_floating_point() and mask.dim() == 3
                and mask.shape[1:] == (n, n) and mask.shape[0] >= 1 and like.shape[0] % mask.shape[0] == 0
                and mask.device == like.device and not mask.requires_grad)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attention inside each window.

        Args:
            hidden_states: ``[B * nW, N, C]`` windows of ``N = Wh * Ww`` tokens.
            attention_mask: ``None`` or the additive ``[nW, N, N]`` shifted-window mask (0 or
                -100); window row ``b`` uses ``attention_mask[b % nW]``.
            **kwargs: Hugging Face's ``TransformersKwargs``.

        Returns:
            ``(attn_output [B * nW, N, C], attn_weights)``: ``attn_weights [B * nW, H, N, N]``
            exactly when Hugging Face's own computation ran (see the module docstring), else ``None``.
        """
        rpb = self.relative_position_bias
        if (self._fusable(hidden_states, kwargs) and hidden_states.shape[1] == rpb.window_area
                and self._index_is_standard()):
            b, n, _ = hidden_states.shape
            q, k, v = self._heads(hidden_states)
            if self._window_mask_servable(attention_mask, q):
                out = attention(q, k, v, scale=self.scaling, rel_pos=self._rel_pos(attention_mask),
                                dropout_p=self._dropout_p())
                return self._merge(out, (b, n)), None
        return self._exact_forward(hidden_states, attention_mask, **kwargs)

    def _exact_forward(self, hidden_states, attention_mask=None, **kwargs):
        """Hugging Face's computation: its forward when this is a :func:`hf_drop_in_class`."""
        hf = _hf_forward(self, HFSwinAttention)
        if hf is not None:
            return hf(self, hidden_states, attention_mask, **kwargs)
        input_shape = hidden_states.shape[:-1]
        q, k, v = self._heads(hidden_states)
        bias = self.relative_position_bias()
        if attention_mask is not None:
            n_windows, seq = attention_mask.shape[0], input_shape[1]
            mask = (attention_mask.unsqueeze(1).unsqueeze(0).expand(input_shape[0] // n_windows, -1, -1, -1, -1)
                    .reshape(-1, 1, seq, seq))
            bias = bias + mask
        out, weights = _attention_function(self.config)(
            self, q, k, v, bias, dropout=self._dropout_p(), scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights

    @torch.no_grad()
    def attention_map(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                      query_index=None) -> torch.Tensor:
        """Attention probabilities ``[B * nW, H, len(query_index), N]`` (no gradient, no dropout)
        for windows ``hidden_states [B * nW, N, C]``; computed on request only."""
        q, k, _ = self._heads(hidden_states)
        return attention_probs(q, k, scale=self.scaling, rel_pos=self._rel_pos(attention_mask),
                               query_index=query_index)


# ----------------------------------------------------------------------------------------------
# the classes ssl_fast.patch gives replaced modules
# ----------------------------------------------------------------------------------------------
_DROP_INS = {"HFViTAttention": HFViTAttention, "HFSwinAttention": HFSwinAttention}
_BUILT: Dict[Tuple[type, type], type] = {}
_PREFIX = "_hf__"


def _qualname(drop_in: type, hf_class: type) -> str:
    return _PREFIX + "__".join([drop_in.__name__, *hf_class.__module__.split("."), hf_class.__name__])


def hf_drop_in_class(drop_in: type, hf_class: type) -> type:
    """The class of a module ``ssl_fast.patch`` replaces: ``drop_in`` (:class:`HFViTAttention` or
    :class:`HFSwinAttention`) first, so its constructor and forward run, then ``hf_class``.

    ``isinstance(module, hf_class)`` stays true, which Hugging Face relies on (its
    ``output_attentions`` recording hooks and weight initialisation find modules by class), and
    the drop-in's exact path calls ``hf_class.forward``. One class per pair, named
    ``<drop_in>_for_<hf_class>``; it pickles by reference (this module rebuilds it on import).

    Args:
        drop_in: :class:`HFViTAttention` or :class:`HFSwinAttention`.
        hf_class: the Hugging Face attention class (an ``nn.Module`` subclass).
    """
    if drop_in not in _DROP_INS.values():
        raise ValueError(f"drop_in must be one of {sorted(_DROP_INS)}, got {drop_in!r}")
    if not isinstance(hf_class, type) or not issubclass(hf_class, nn.Module) or issubclass(hf_class, drop_in):
        raise TypeError(f"hf_class must be a Hugging Face nn.Module class, got {hf_class!r}")
    key = (drop_in, hf_class)
    cls = _BUILT.get(key)
    if cls is None:
        qualname = _qualname(drop_in, hf_class)
        cls = type(f"{drop_in.__name__}_for_{hf_class.__name__}", (drop_in, hf_class), {
            "__module__": __name__, "__qualname__": qualname,
            "__doc__": f"ssl_fast.nn.{drop_in.__name__} serving {hf_class.__module__}.{hf_class.__qualname__}."})
        _BUILT[key] = cls
        globals()[qualname] = cls
    return cls


def __getattr__(name: str):
    """Rebuild a :func:`hf_drop_in_class` class by its qualified name (unpickling elsewhere)."""
    if name.startswith(_PREFIX):
        parts = name[len(_PREFIX):].split("__")
        if len(parts) >= 3 and parts[0] in _DROP_INS:
            import importlib

            module = importlib.import_module(".".join(parts[1:-1]))
            return hf_drop_in_class(_DROP_INS[parts[0]], getattr(module, parts[-1]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
