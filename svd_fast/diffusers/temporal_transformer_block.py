"""A frame-major drop-in for diffusers' TemporalBasicTransformerBlock.

diffusers' block receives (B*F, S, C), permutes it to (B*S, F, C), runs LayerNorm / feed-forward /
self-attention over frames / cross-attention / feed-forward, and permutes back. LayerNorm, the
feed-forwards and the projections act per token, so only the attention needs the frame axis;
:class:`FusedTemporalBasicTransformerBlock` keeps (B*F, S, C) end to end and attends over frames with
:func:`svd_fast.ops.temporal_attention`, which reads q/k/v in that layout. The two permute copies of the
activation disappear.

The cross-attention in SVD's temporal blocks attends to one context token per position, so it is
exactly ``to_out(to_v(context))`` (the softmax over one key is 1): no query, key or norm2 is computed.
That context is the same token for every position of a video: diffusers' TransformerSpatioTemporalModel, the
only model built from these blocks, broadcasts the first frame's context over the B*S positions (its
``time_context``). So to_v and to_out run on the B rows of position 0 (not on B*S identical rows, 18,432 at
SVD-XT's top level) and the result is broadcast over positions and frames.
Any other context (several tokens), or an attention configured in a way this block does not reproduce,
falls back to running diffusers' own module on the permuted layout, which is exact.

The block shares every submodule with the diffusers block it was built from, under the same names, so
parameters and state_dict keys are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention import TemporalBasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn

from svd_fast.diffusers.attention_processors import SingleTokenCrossAttnProcessor
from svd_fast.ops.temporal_attention import temporal_attention


def _default_processor(processor: Any) -> bool:

    return type(processor) in (AttnProcessor, AttnProcessor2_0)


def _plain_cross_attention(attention: nn.Module) -> bool:
    """True when ``attention`` computes plain softmax attention (diffusers' default processors, or svd_fast's
    single-token shortcut of them), so that with one context token it equals to_out(to_v(context))."""

    processor = attention.processor
    if isinstance(processor, SingleTokenCrossAttnProcessor):
        processor = processor.fallback
    return (
        _default_processor(processor)
        and attention.spatial_norm is None
        and attention.group_norm is None
        and not attention.residual_connection
        and attention.rescale_output_factor == 1.0
    )


def unsupported_reason(block: nn.Module) -> str | None:
    """Why ``block`` cannot be converted (None when it can): only configurations reproduced exactly convert."""

    if not isinstance(block, TemporalBasicTransformerBlock):
        return f"expected a diffusers TemporalBasicTransformerBlock, got {type(block).__name__}"
    attn = block.attn1
    if not _default_processor(attn.processor):
        return f"attn1 has a custom processor {type(attn.processor).__name__}"
    unusual = {
        "norm_q": attn.norm_q is not None,
        "norm_k": attn.norm_k is not None,
        "spatial_norm": attn.spatial_norm is not None,
        "group_norm": attn.group_norm is not None,
        "residual_connection": attn.residual_connection,
        "rescale_output_factor": attn.rescale_output_factor != 1.0,
        "is_cross_attention": attn.is_cross_attention,
    }
    used = [name for name, present in unusual.items() if present]
    if used:
        return f"attn1 uses {', '.join(used)}, which the fused block does not reproduce"
    return None


class FusedTemporalBasicTransformerBlock(nn.Module):
    """TemporalBasicTransformerBlock computed in the frame-major layout; same forward signature and result."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        reason = unsupported_reason(block)
        if reason is not None:
            raise ValueError(f"FusedTemporalBasicTransformerBlock: cannot convert this block: {reason}")
        self.is_res = block.is_res
        self.norm_in, self.ff_in = block.norm_in, block.ff_in
        self.norm1, self.attn1 = block.norm1, block.attn1
        self.norm2, self.attn2 = block.norm2, block.attn2
        self.norm3, self.ff = block.norm3, block.ff
        self._chunk_size: int | None = block._chunk_size  # noqa: SLF001 - diffusers keeps the chunk size private

    @classmethod
    def from_diffusers(cls, block: nn.Module) -> FusedTemporalBasicTransformerBlock:
        """A fused block sharing ``block``'s submodules (and so its parameters and state_dict keys)."""
        return cls(block)

    def set_chunk_feed_forward(self, chunk_size: int | None, **kwargs: Any) -> None:
        """Feed-forward chunking, as diffusers' ``unet.enable_forward_chunking`` sets it (the chunked dimension
        is fixed, as in diffusers' block: see :meth:`_feed_forward`)."""
        self._chunk_size = chunk_size

    def _feed_forward(self, ff: nn.Module, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        if self._chunk_size is None:
            return ff(hidden_states)
        # diffusers chunks its (B*S, F, C) layout along frames into F / chunk_size pieces; the same number
        # of pieces here are groups of B * chunk_size rows of (B*F, S, C): the same memory per piece.
        if num_frames % self._chunk_size != 0:
            raise ValueError(
                f"feed-forward chunk size {self._chunk_size} must divide the number of frames {num_frames}"
            )
        rows_per_chunk = hidden_states.shape[0] // num_frames * self._chunk_size
        return torch.cat([ff(piece) for piece in hidden_states.split(rows_per_chunk, dim=0)], dim=0)

    def _self_attention(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        attn = self.attn1
        if attn.fused_projections:
            # diffusers' fuse_projections(): one GEMM; the op reads the three slices of its output in place.
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        output = temporal_attention(query, key, value, num_frames, attn.heads, attn.scale)
        return attn.to_out[1](attn.to_out[0](output))

    def _cross_attention(
        self, hidden_states: torch.Tensor, num_frames: int, encoder_hidden_states: torch.Tensor | None
    ) -> torch.Tensor:
        """hidden_states + attn2(norm2(hidden_states), context), with context (B*S, tokens, C_ctx) position-major
        (one token: the same for every position of a video, see the module docstring)."""
        attn = self.attn2
        batch_frames, positions, channels = hidden_states.shape
        batch = batch_frames // num_frames
        single_token = (
            encoder_hidden_states is not None
            and encoder_hidden_states.ndim == 3
            and encoder_hidden_states.shape[0] == batch * positions
            and encoder_hidden_states.shape[1] == 1
            and _plain_cross_attention(attn)
        )
        if single_token:
            per_video = encoder_hidden_states.unflatten(0, (batch, positions))[:, 0]  # (B, 1, C_ctx)
            context = attn.norm_encoder_hidden_states(per_video) if attn.norm_cross else per_video
            value = attn.to_out[1](attn.to_out[0](attn.to_v(context)))  # (B, 1, C)
            per_frame = hidden_states.unflatten(0, (batch, num_frames))
            return (per_frame + value.view(batch, 1, 1, channels)).flatten(0, 1)
        # Any other context (or none: attn2 then attends over frames): diffusers' attention on its own layout.
        position_major = hidden_states.unflatten(0, (batch, num_frames)).transpose(1, 2)
        position_major = position_major.reshape(batch * positions, num_frames, channels)
        attended = attn(self.norm2(position_major), encoder_hidden_states=encoder_hidden_states)
        attended = attended.view(batch, positions, num_frames, channels).transpose(1, 2)
        return hidden_states + attended.reshape(batch_frames, positions, channels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        num_frames: int,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self._feed_forward(self.ff_in, self.norm_in(hidden_states), num_frames)
        if self.is_res:
            hidden_states = hidden_states + residual

        hidden_states = self._self_attention(self.norm1(hidden_states), num_frames) + hidden_states

        if self.attn2 is not None:
            hidden_states = self._cross_attention(hidden_states, num_frames, encoder_hidden_states)

        ff_output = self._feed_forward(self.ff, self.norm3(hidden_states), num_frames)
        return ff_output + hidden_states if self.is_res else ff_output
