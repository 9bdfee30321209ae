"""Document-wise causal attention for packed rows: "varlen" attention without flash-attn.

A packed row holds several documents. Instead of one (L x L) attention with a block-diagonal mask
(which still computes every masked block), each document gets its own causal
``scaled_dot_product_attention`` on its slice, so the cost is sum(len^2) rather than L^2, the fast
``is_causal`` kernels apply, and documents cannot see each other by construction. Padding after
the last document gets zeros (its outputs never reach the loss).

It is registered with transformers' AttentionInterface and receives the row layout as the
``doc_lens`` keyword that the model forwards to its attention layers. Without ``doc_lens``
(generation, evaluation by other tools) it is plain causal sdpa.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "kubetune_packed"


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, doc_lens=None, **kwargs):
    # query: (batch, heads, length, dim); key/value may have fewer heads (grouped-query attention)
    gqa = key.shape[1] != query.shape[1]
    p = dropout if module.training else 0.0
    if doc_lens is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=query.shape[2] > 1,
                                             scale=scaling, dropout_p=p, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    rows = []
    length = query.shape[2]
    for b, lens in enumerate(doc_lens):
        parts, start = [], 0
        for n in lens:
            s = slice(start, start + n)
            parts.append(F.scaled_dot_product_attention(
                query[b : b + 1, :, s], key[b : b + 1, :, s], value[b : b + 1, :, s],
                is_causal=True, scale=scaling, dropout_p=p, enable_gqa=gqa))
            start += n
        if start < length:
            parts.append(query.new_zeros(1, query.shape[1], length - start, query.shape[3]))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)
    return NAME
