"""``nn.MultiheadAttention``: heads and the model dimension, removed for real.

The stock module ties its inner width (``num_heads * head_dim``) to ``embed_dim``, the
size of its inputs, so it cannot hold fewer heads than the model dimension implies.
After pruning it is replaced by :class:`PrunedMultiheadAttention`: same forward
signature, same ``state_dict`` keys, separate inner and model widths. (Torch-Pruning
1.6.1 silently leaves the head count unchanged here; we remove the heads or say why not.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .handlers import Handler, handler_for, register_handler
from .trace import Trace


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention whose inner width ``num_heads * head_dim`` may differ from ``embed_dim``.

    ``_qkv_same_embed_dim`` is False on purpose: PyTorch's fused Transformer fast paths assume
    the inner width equals ``embed_dim`` and must not take this module.
    """

    _qkv_same_embed_dim = False

    def __init__(
        self, embed_dim: int, num_heads: int, head_dim: int, kdim: int | None = None, vdim: int | None = None,
        out_dim: int | None = None, bias: bool = True, add_bias_kv: bool = False, add_zero_attn: bool = False,
        dropout: float = 0.0, batch_first: bool = False, packed: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        empty = torch.empty
        self.in_proj_weight = nn.Parameter(empty(3 * inner, embed_dim)) if packed else None
        self.q_proj_weight = None if packed else nn.Parameter(empty(inner, embed_dim))
        self.k_proj_weight = None if packed else nn.Parameter(empty(inner, self.kdim))
        self.v_proj_weight = None if packed else nn.Parameter(empty(inner, self.vdim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.bias_k = nn.Parameter(torch.zeros(1, 1, inner)) if add_bias_kv else None
        self.bias_v = nn.Parameter(torch.zeros(1, 1, inner)) if add_bias_kv else None
        self.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(inner, out_dim or embed_dim, bias=bias)

    @classmethod
    def like(cls, mha: nn.Module) -> PrunedMultiheadAttention:
        """A module with ``mha``'s current tensors (shared, not copied) and settings."""
        packed = mha.in_proj_weight is not None
        q = mha.in_proj_weight if packed else mha.q_proj_weight
        inner = q.shape[0] // 3 if packed else q.shape[0]
        head_dim = mha.head_dim
        heads = inner // head_dim
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.embed_dim, new.num_heads, new.head_dim = q.shape[1], heads, head_dim
        new.kdim = q.shape[1] if packed else mha.k_proj_weight.shape[1]
        new.vdim = q.shape[1] if packed else mha.v_proj_weight.shape[1]
        new.dropout, new.batch_first, new.add_zero_attn = mha.dropout, mha.batch_first, mha.add_zero_attn
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
            new.register_parameter(name, getattr(mha, name))
        new.register_parameter("bias_k", mha.bias_k)
        new.register_parameter("bias_v", mha.bias_v)
        new.out_proj = mha.out_proj
        new.train(mha.training)
        return new

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        inner = self.num_heads * self.head_dim
        if self.in_proj_weight is not None and query is key is value:  # self-attention: one GEMM, as stock
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).split(inner, dim=-1)
        b = self.in_proj_bias.split(inner) if self.in_proj_bias is not None else (None, None, None)
        if self.in_proj_weight is not None:
            wq, wk, wv = self.in_proj_weight.split(inner)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, b[0]), F.linear(key, wk, b[1]), F.linear(value, wv, b[2])

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
        need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        batched = query.dim() == 3
        if not batched:
            query, key, value = _same_op(query, key, value, lambda x: x.unsqueeze(1))
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif self.batch_first:
            query, key, value = _same_op(query, key, value, lambda x: x.transpose(0, 1))
        # (L, N, E) from here on, as in F.multi_head_attention_forward
        tgt, bsz = query.shape[:2]
        q, k, v = self._project(query, key, value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, bsz, -1)])
            v = torch.cat([v, self.bias_v.expand(1, bsz, -1)])
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        heads, hd = self.num_heads, self.head_dim
        q, k, v = (x.reshape(x.shape[0], bsz * heads, hd).transpose(0, 1) for x in (q, k, v))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz * heads, 1, hd)], dim=1)
            v = torch.cat([v, v.new_zeros(bsz * heads, 1, hd)], dim=1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        src = k.shape[1]
        mask = _additive(attn_mask, key_padding_mask, bsz, heads, tgt, src, q.dtype)
        if mask is None and is_causal:
            mask = torch.full((tgt, src), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        q, k, v = (x.view(bsz, heads, -1, hd) for x in (q, k, v))
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            out = F.dropout(weights, p, self.training) @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt, bsz, heads * hd))
        if not batched:
            return out.squeeze(1), weights
        return (out.transpose(0, 1) if self.batch_first else out), weights


def _same_op(query: Tensor, key: Tensor, value: Tensor, op) -> tuple[Tensor, Tensor, Tensor]:
    """Apply ``op`` to each input once, keeping self-attention's ``query is key is value``."""
    done: dict[int, Tensor] = {}
    for x in (query, key, value):
        if id(x) not in done:
            done[id(x)] = op(x)
    return done[id(query)], done[id(key)], done[id(value)]


def _additive(attn_mask, key_padding_mask, bsz, heads, tgt, src, dtype) -> Tensor | None:
    """nn.MultiheadAttention's masks (True = blocked, or float to add) as one additive mask."""
    out = None
    if attn_mask is not None:
        m = attn_mask if attn_mask.is_floating_point() else torch.zeros_like(attn_mask, dtype=dtype).masked_fill(
            attn_mask, float("-inf"))  # fmt: skip
        out = m.reshape(bsz, heads, tgt, src) if m.dim() == 3 else m.reshape(1, 1, tgt, src)
    if key_padding_mask is not None:
        k = key_padding_mask
        m = k.to(dtype) if k.is_floating_point() else torch.zeros_like(k, dtype=dtype).masked_fill(k, float("-inf"))
        m = m.reshape(bsz, 1, 1, src)
        out = m if out is None else out + m
    return out


class MultiheadAttentionHandler(Handler):
    """Heads, model dimension and output dimension of ``nn.MultiheadAttention``."""

    name = "multihead_attention"

    def trace(self, t: Trace, name, module, args, kwargs, output):
        names = ("query", "key", "value")
        inputs = [args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names)]
        vecs = [t.channel(x, -1) for x in inputs]
        packed = module.in_proj_weight is not None
        inner = (module.in_proj_weight if packed else module.q_proj_weight).shape[0] // (3 if packed else 1)
        heads = module.num_heads
        head_ids = t.source(name, f"{name}:heads", heads, kind="head")
        rows = head_ids.repeat_interleave(inner // heads)
        if packed:
            t.couple(vecs[0], vecs[1])
            t.couple(vecs[0], vecs[2])
            t.port(name, "in_proj_weight", 1, vecs[0], "in", name)
            t.port(name, "in_proj_weight", 0, rows.repeat(3), "out", name)
        else:
            for n, vec in zip(("q", "k", "v"), vecs):
                t.port(name, f"{n}_proj_weight", 1, vec, "in", name)
                t.port(name, f"{n}_proj_weight", 0, rows, "out", name)
        if module.in_proj_bias is not None:
            t.port(name, "in_proj_bias", 0, rows.repeat(3), "out", name)
        if module.bias_k is not None:
            t.port(name, "bias_k", 2, rows, "out", name)
            t.port(name, "bias_v", 2, rows, "out", name)
        out_name = f"{name}.out_proj"
        t.port(out_name, "weight", 1, rows, "in", name)
        ids = t.source(name, out_name, module.out_proj.out_features)
        t.port(out_name, "weight", 0, ids, "out", name)
        if module.out_proj.bias is not None:
            t.port(out_name, "bias", 0, ids, "out", name)
        t.label(output[0], -1, ids)

    def update(self, module, name, edit, kept):
        handler_for(module.out_proj).update(module.out_proj, "", edit, {})
        new = PrunedMultiheadAttention.like(module)
        if isinstance(module, PrunedMultiheadAttention):
            for attr in ("embed_dim", "num_heads", "kdim", "vdim"):
                edit.set(module, attr, getattr(new, attr))
        else:
            edit.replace(name, new)


register_handler(nn.MultiheadAttention, MultiheadAttentionHandler())
register_handler(PrunedMultiheadAttention, MultiheadAttentionHandler())
