"""Reference temporal attention: diffusers' path (permute to position-major, SDPA, permute back).

Layout (frame-major, as SVD's UNet holds its activations): q, k, v have shape (B*F, S, H*D) with row
``b*F + f`` holding frame f of video b, S spatial positions and H heads of D channels. Each (b, s, h)
attends over its F frames. The math runs in float32 (float64 for float64 input) and the output is cast
back, so this is also the ground truth the kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_position_major(x: torch.Tensor, num_frames: int, num_heads: int) -> torch.Tensor:
    """(B*F, S, H*D) -> (B, S, H, F, D): a view, for any strides."""
    x = x.unflatten(0, (-1, num_frames)).unflatten(-1, (num_heads, -1))  # (B, F, S, H, D)
    return x.permute(0, 2, 3, 1, 4)


def to_frame_major(x: torch.Tensor) -> torch.Tensor:
    """(B, S, H, F, D) -> contiguous (B*F, S, H*D)."""
    batch, positions, heads, frames, head_dim = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(batch * frames, positions, heads * head_dim)


def temporal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int, num_heads: int, scale: float
) -> torch.Tensor:
    """softmax(scale * q k^T) v over the frame axis; differentiable; output (B*F, S, H*D) in q's dtype."""
    dtype = compute_dtype(q.dtype)
    q4, k4, v4 = (to_position_major(t.to(dtype), num_frames, num_heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q4, k4, v4, scale=scale)
    return to_frame_major(out).to(q.dtype)


def temporal_attention_lse(
    q: torch.Tensor, k: torch.Tensor, num_frames: int, num_heads: int, scale: float
) -> torch.Tensor:
    """Natural-log sum of exp(scale * q_i . k_j) over key frames j, shape (B*F, S, H) in the compute dtype:
    the statistic the kernels save for their backward."""
    dtype = compute_dtype(q.dtype)
    q4, k4 = (to_position_major(t.to(dtype), num_frames, num_heads) for t in (q, k))
    scores = scale * (q4 @ k4.transpose(-1, -2))  # (B, S, H, F, F)
    lse = torch.logsumexp(scores, dim=-1)  # (B, S, H, F)
    return lse.permute(0, 3, 1, 2).reshape(q.shape[0], q.shape[1], num_heads)
