"""Single-token cross-attention shortcut for SVD's UNet.

Every cross-attention in SVD attends to ONE context token (the CLIP image embedding), so the softmax
over keys is exactly 1 and ``attn(x, ctx) == to_out(to_v(ctx))`` broadcast over the query tokens: no
Q/K projections and no attention kernel. This processor computes that and defers to the attention's
original processor for anything else (several context tokens, masks, spatial/group norms, 4-D input).
Exact in inference; in training it matches too as long as to_out's dropout is 0 (SVD's is).
"""

from __future__ import annotations

from typing import Any

import torch


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
        if attn.residual_connection:
            output = output + hidden_states
        if attn.rescale_output_factor != 1.0:
            output = output / attn.rescale_output_factor
        return output
