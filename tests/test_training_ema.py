"""EMA warm-up (decay_k = min(decay, (1 + k) / (10 + k))), its checkpointed update count, and fragment assembly."""

from __future__ import annotations

import pytest
import torch

from svd_fast.training.ema import MasterFragment, ShardedEMA, gather_full


def test_ema_warm_up_follows_litema_and_resumes_from_its_count() -> None:
    module = torch.nn.Linear(3, 2)
    start = module.weight.detach().clone()
    ema = ShardedEMA(module, decay=0.9999)
    assert [ema.decay_at(k) for k in (0, 1, 100_000)] == pytest.approx([0.1, 2 / 11, 0.9999])
    expected = start.clone()
    for k in range(3):
        with torch.no_grad():
            module.weight.add_(1.0)
        ema.update(module)
        expected = ema.decay_at(k) * expected + (1 - ema.decay_at(k)) * module.weight.detach()
    torch.testing.assert_close(ema.full_state()["weight"], expected)
    resumed = ShardedEMA(module, decay=0.9999)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.updates == 3 and torch.equal(resumed.full_state()["weight"], ema.full_state()["weight"])


def test_gather_full_places_fragments() -> None:
    fragments = {"w": MasterFragment(torch.tensor([5.0, 6.0]), 2, torch.Size([2, 2]))}
    full = gather_full(fragments, {"w": torch.Size([2, 2])})
    assert torch.equal(full["w"], torch.tensor([[0.0, 0.0], [5.0, 6.0]]))
