"""Step caching for SVD's UNet (DeepCache, Ma et al. 2023), opt-in through ``optimize(pipe, cache_interval=N)``.

Between sampling steps the deep UNet features change slowly. Every N-th step (step 0 first) is a full UNet
pass that also keeps the output of all the deeper levels, i.e. the hidden state entering the last (outermost)
up block. On the N - 1 steps in between only the outermost level runs: conv_in, the first down block (for its
skip connections), then the last up block on the kept deep features, and the output head. This changes the
result: the deviation from the uncached pipeline is measured in bench/bench_sampling.py and grows with N.

The forward below is diffusers' UNetSpatioTemporalConditionModel.forward (hash pinned in
patching.COPIED_FORWARDS), split at the outermost level.
"""

from __future__ import annotations

import torch
from torch import nn


def check_cache_interval(cache_interval: object) -> int:
    if isinstance(cache_interval, bool) or not isinstance(cache_interval, int) or cache_interval < 1:
        raise ValueError(f"optimize: cache_interval must be an int >= 1 (1: no caching), got {cache_interval!r}")
    return cache_interval


def _block_kwargs(block: nn.Module, encoder_hidden_states: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"encoder_hidden_states": encoder_hidden_states} if getattr(block, "has_cross_attention", False) else {}


class CachedUNetStep:
    """``step_unet(sample, timestep, encoder_hidden_states, added_time_ids, step)``: the UNet's output tensor,
    from a full pass on every ``interval``-th step and from the outermost level plus the kept deep features
    on the others."""

    def __init__(self, unet: nn.Module, interval: int) -> None:
        self.unet = unet
        self.interval = check_cache_interval(interval)
        self.deep_features: torch.Tensor | None = None

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_time_ids: torch.Tensor,
        step: int,
    ) -> torch.Tensor:
        unet = self.unet
        batch, frames = sample.shape[:2]
        timesteps = timestep[None] if timestep.dim() == 0 else timestep
        emb = unet.time_embedding(unet.time_proj(timesteps.to(sample.device).expand(batch)).to(dtype=sample.dtype))
        time_embeds = unet.add_time_proj(added_time_ids.flatten()).reshape((batch, -1)).to(emb.dtype)
        emb = (emb + unet.add_embedding(time_embeds)).repeat_interleave(frames, dim=0, output_size=batch * frames)
        context = encoder_hidden_states.repeat_interleave(frames, dim=0, output_size=encoder_hidden_states.shape[0] * frames)
        hidden = unet.conv_in(sample.flatten(0, 1))
        indicator = torch.zeros(batch, frames, dtype=hidden.dtype, device=hidden.device)
        common = {"temb": emb, "image_only_indicator": indicator}

        full = step % self.interval == 0 or self.deep_features is None or self.deep_features.shape[0] != hidden.shape[0]
        skips: tuple[torch.Tensor, ...] = (hidden,)
        blocks = unet.down_blocks if full else unet.down_blocks[:1]
        for block in blocks:
            hidden, residuals = block(hidden_states=hidden, **common, **_block_kwargs(block, context))
            skips += residuals
        if full:
            hidden = unet.mid_block(hidden_states=hidden, encoder_hidden_states=context, **common)
            upsample_size = None
            for block in unet.up_blocks[:-1]:
                residuals, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
                if any(s % 2 ** unet.num_upsamplers for s in sample.shape[-2:]):
                    upsample_size = skips[-1].shape[2:]
                hidden = block(
                    hidden_states=hidden, res_hidden_states_tuple=residuals, upsample_size=upsample_size,
                    **common, **_block_kwargs(block, context),
                )  # fmt: skip
            self.deep_features = hidden
        last = unet.up_blocks[-1]
        residuals = skips[: len(last.resnets)]
        hidden = last(
            hidden_states=self.deep_features, res_hidden_states_tuple=residuals, upsample_size=None,
            **common, **_block_kwargs(last, context),
        )  # fmt: skip
        hidden = unet.conv_out(unet.conv_act(unet.conv_norm_out(hidden)))
        return hidden.reshape(batch, frames, *hidden.shape[1:])
