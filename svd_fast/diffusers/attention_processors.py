"""Attention processors for SVD's UNet: the single-token cross-attention shortcut, and flash-attn self-attention.

Every cross-attention in SVD attends to ONE context token (the CLIP image embedding), so the softmax
over keys is exactly 1 and ``attn(x, ctx) == to_out(to_v(ctx))`` broadcast over the query tokens: no
Q/K projections and no attention kernel. :class:`SingleTokenCrossAttnProcessor` computes that and defers
to the attention's original processor for anything else (several context tokens, masks, spatial/group
norms, 4-D input). Exact in inference; in training it matches too as long as to_out's dropout is 0 (SVD's is).

:class:`FlashAttnSelfAttnProcessor` runs self-attention through the optional flash-attn package.
"""

from __future__ import annotations

from typing import Any

import torch


def _residual_and_rescale(attn: Any, output: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
    """The end of every diffusers attention processor: optional residual, then the output rescale."""
    if attn.residual_connection:
        output = output + hidden_states
    if attn.rescale_output_factor != 1.0:
        output = output / attn.rescale_output_factor
    return output


class SingleTokenCrossAttnProcessor:
    """A diffusers attention processor: ``to_out(to_v(context))`` when the context is a single token."""

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        single_token = (
            encoder_hidden_states is not None
            and encoder_hidden_states.ndim == 3
            and encoder_hidden_states.shape[1] == 1
            and encoder_hidden_states.shape[0] == hidden_states.shape[0]
            and hidden_states.ndim == 3
        )
        if not single_token or attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        value = attn.to_out[1](attn.to_out[0](attn.to_v(context)))  # (batch, 1, channels)
        output = value.expand(-1, hidden_states.shape[1], -1)
        return _residual_and_rescale(attn, output, hidden_states)


# flash-attn runs on CUDA tensors only; a module constant so that the tests can route a stand-in through
# the processor on CPU.
FLASH_ATTN_DEVICE_TYPE = "cuda"
FLASH_ATTN_DTYPES = (torch.float16, torch.bfloat16)
FLASH_ATTN_MAX_HEAD_DIM = 256


def flash_attn_unavailable_reason() -> str | None:
    """None when the optional flash-attn package can be imported, else why not."""
    try:
        import flash_attn  # noqa: F401, PLC0415 - optional dependency
    except ImportError as error:
        return f"flash-attn is not installed ({error})"
    return None


class FlashAttnSelfAttnProcessor:
    """A diffusers attention processor for self-attention through flash-attn's ``flash_attn_func``.

    flash-attn takes (batch, tokens, heads, head_dim), which is what the projections produce once their last
    dimension is split into heads: no transposes (diffusers' SDPA path transposes to (batch, heads, tokens,
    head_dim) and back). Calls it cannot take (cross-attention, masks, float32, CPU tensors, norms on q/k)
    go to the attention's original processor.
    """

    def __init__(self, fallback: Any) -> None:
        from flash_attn import flash_attn_func  # noqa: PLC0415 - optional dependency; optimize checks it first

        self.fallback = fallback
        self.flash_attn_func = flash_attn_func

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        head_dim = attn.inner_dim // attn.heads
        usable = (
            encoder_hidden_states is None
            and attention_mask is None
            and hidden_states.ndim == 3
            and hidden_states.device.type == FLASH_ATTN_DEVICE_TYPE
            and hidden_states.dtype in FLASH_ATTN_DTYPES
            and head_dim <= FLASH_ATTN_MAX_HEAD_DIM
            and attn.spatial_norm is None
            and attn.group_norm is None
            and attn.norm_q is None
            and attn.norm_k is None
        )
        if not usable:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        query, key, value = (
            projection(hidden_states).unflatten(-1, (attn.heads, head_dim)) for projection in (attn.to_q, attn.to_k, attn.to_v)
        )
        output = self.flash_attn_func(query, key, value, softmax_scale=attn.scale).flatten(-2)
        output = attn.to_out[1](attn.to_out[0](output.to(query.dtype)))
        return _residual_and_rescale(attn, output, hidden_states)
