"""Self-attention of open_clip's towers computed in their batch-first layout.

open_clip's blocks call a batch-first ``nn.MultiheadAttention`` as ``attn(x, x, x, need_weights=False,
attn_mask=mask)``. PyTorch's implementation of that call works sequence-first: it transposes the (N, L, D) input
to (L, N, D), projects, and copies q / k / v apart (``_in_projection_packed``: a (3, L, N, D) copy) before
``scaled_dot_product_attention``; under CPU autocast it also leaves its fast path and projects the transposed view,
which ``torch.matmul`` does not fold into one GEMM (it copies the weight once per position: a ViT-B/16 image tower
under bf16 was slower than in fp32 until the backbone worked around it, see docs/benchmarks/precision.md).

:func:`packed_self_attention` computes the same attention from the batch-first input: one GEMM of the packed
projection, q / k / v as strided views of its output (no copy), SDPA, the heads merged, the output projection.
Measured on a ViT-B/16 image tower, batch 32, 1 thread (benchmarks/precision.py, docs/benchmarks/precision.md):
1.12x ``nn.MultiheadAttention``'s native fast path in fp32 (features within 1e-6 relative), 4.9x its forward under
bf16 autocast, and 1.05x (by hand, once) the sequence-first input layout the backbone fed it before, with bitwise
the same features. :class:`BatchFirstSelfAttention` is what the backbone's CPU towers use, and
:class:`~vlprompt.backbone.patches.LoRAAttention` computes its attention with the same function.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


def packed_self_attention(x: torch.Tensor, num_heads: int,
                          in_projection: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                          out_projection: Callable[[torch.Tensor], torch.Tensor],
                          attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head self-attention of a batch-first ``x`` (N, L, D): ``in_projection(x)`` gives q, k, v (N, L, D)
    each (views are fine), ``out_projection`` maps the merged heads (N, L, D) back. ``attn_mask``: as
    ``nn.MultiheadAttention`` takes it, (L, L) or (N * H, L, L), boolean (True = not allowed) or additive."""
    n, length, d = x.shape
    q, k, v = in_projection(x)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n, length, num_heads, d // num_heads).transpose(1, 2)

    mask = attn_mask
    if mask is not None:
        if mask.dtype == torch.bool:  # nn.MultiheadAttention: True = not allowed; SDPA: True = allowed
            mask = ~mask
        else:
            mask = mask.to(q.dtype)
        if mask.dim() == 3:
            mask = mask.reshape(n, num_heads, length, length)
    o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
    return out_projection(o.transpose(1, 2).reshape(n, length, d))


class BatchFirstSelfAttention(nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` (batch-first, packed q / k / v, no added key / value biases, no dropout) whose
    self-attention calls run :func:`packed_self_attention`; any other call (cross-attention, ``need_weights``,
    a key padding mask, dropout in training) goes to ``nn.MultiheadAttention.forward`` unchanged. Installed on
    open_clip's modules in place by :func:`use_batch_first_self_attention` (same parameters, same state dict)."""

    def _in(self, x: torch.Tensor):
        return F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        plain = (key is query or key is None) and (value is query or value is None) and query.dim() == 3
        if (not plain or need_weights or key_padding_mask is not None or is_causal
                or (self.training and self.dropout > 0)):
            return super().forward(query, query if key is None else key, query if value is None else value,
                                   key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return packed_self_attention(query, self.num_heads, self._in, self.out_proj, attn_mask), None


def use_batch_first_self_attention(model: nn.Module) -> int:
    """Make every plain batch-first ``nn.MultiheadAttention`` of ``model`` a :class:`BatchFirstSelfAttention` (in
    place: the class changes, nothing else). Returns how many."""
    count = 0
    for m in model.modules():
        if (type(m) is nn.MultiheadAttention and m.batch_first and m._qkv_same_embed_dim
                and m.bias_k is None and m.bias_v is None and not m.add_zero_attn):
            m.__class__ = BatchFirstSelfAttention
            count += 1
    return count
