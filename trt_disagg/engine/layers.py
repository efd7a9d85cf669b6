"""The Llama building blocks, written for a flat batch of new tokens over a paged KV cache.

Numerics follow the Llama reference (and Hugging Face's implementation of it) so greedy tokens match:
RMSNorm in float32, rotary embedding with the rotate-half convention, SDPA attention with grouped KV heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trt_disagg.engine.step_input import StepTensors


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Rotary:
    """cos/sin tables for positions [0, max_positions), computed once per model."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, device: torch.device | None = None) -> None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos().to(device), emb.sin().to(device)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]."""
        cos = self.cos[positions][:, None, :].to(x.dtype)
        sin = self.sin[positions][:, None, :].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


def paged_attention(
    q: torch.Tensor,  # [T, heads, d] new queries (rotary applied)
    k_cache: torch.Tensor,  # [slots, kv_heads, d] this layer's cache, new keys already written
    v_cache: torch.Tensor,
    st: StepTensors,
) -> torch.Tensor:
    """Attention of each sequence's new tokens over its whole context; returns [T, heads * d]."""
    num_tokens, num_heads, head_dim = q.shape
    q_pad = q[st.query_index]  # [B, Qmax, H, d]
    keys = k_cache[st.context_slots]  # [B, Cmax, KVH, d]
    values = v_cache[st.context_slots]
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=st.key_mask, enable_gqa=True,
    )  # [B, H, Qmax, d]
    out = out.transpose(1, 2).reshape(-1, num_heads, head_dim)[st.query_rows]  # [T, H, d] in flat order
    return out.reshape(num_tokens, num_heads * head_dim)
