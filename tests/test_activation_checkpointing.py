"""Activation checkpointing modes: the same loss and gradients as without (1e-5), the chosen blocks really
recompute in backward, names and state dict unchanged, and undo restores the original classes."""

from __future__ import annotations

import pytest
import torch

from svd_fast.diffusers.tiny import tiny_pipeline
from svd_fast.training.activation_checkpointing import (
    checkpointed_module_names,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
)


def _loss_and_grads(unet: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    frames = 4
    sample = torch.randn(1, frames, unet.config.in_channels, 8, 8, generator=generator)
    embeds = torch.randn(1, 1, unet.config.cross_attention_dim, generator=generator)
    unet.zero_grad(set_to_none=True)
    out = unet(sample, torch.tensor([0.3]), encoder_hidden_states=embeds, added_time_ids=torch.tensor([[6.0, 127.0, 0.02]]), return_dict=False)[0]
    loss = out.square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in unet.parameters()]


@pytest.mark.parametrize("mode", ["temporal", "resnets", "all"])
def test_checkpointing_mode_gives_the_same_loss_and_gradients(mode: str) -> None:
    unet = tiny_pipeline(seed=0).unet.train()
    reference_loss, reference_grads = _loss_and_grads(unet)
    names_before = [name for name, _ in unet.named_parameters()]
    checkpointed = enable_activation_checkpointing(unet, mode)
    assert checkpointed and checkpointed == checkpointed_module_names(unet, mode)
    calls = {"count": 0}
    unet.get_submodule(checkpointed[0]).register_forward_pre_hook(lambda *args: calls.__setitem__("count", calls["count"] + 1))
    loss, grads = _loss_and_grads(unet)
    assert calls["count"] == 2  # forward, and again in backward
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-5)
    for grad, reference in zip(grads, reference_grads):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-5)
    assert [name for name, _ in unet.named_parameters()] == names_before
    disable_activation_checkpointing(unet)
    assert not any(type(module).__name__.startswith("Checkpointed") for module in unet.modules())


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="activation_checkpointing"):
        checkpointed_module_names(torch.nn.Linear(1, 1), "some")
