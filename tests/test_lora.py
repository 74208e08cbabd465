"""svd_fast.load_lora at inference on the tiny UNet: an adapter at scale s equals peft's merged export at s
(fused and unfused), several adapters add up, unfuse / unload restore the weights bit-exactly, it works on an
optimized UNet and survives restore(), and bad files are one-line errors naming the problem. CPU."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from safetensors.torch import load_file, save_file

import svd_fast
from svd_fast.diffusers.tiny import TINY_UNET_CONFIG
from svd_fast.training.lora import add_lora, lora_config, merge_lora, save_lora
from svd_fast.training.lora import load_lora as load_lora_as_peft

RANK, ALPHA = 2, 6.0  # scaling alpha / r = 3: a wrong scaling is a factor 3 off


@pytest.fixture(scope="module")
def base() -> UNetSpatioTemporalConditionModel:
    torch.manual_seed(0)
    return UNetSpatioTemporalConditionModel(**TINY_UNET_CONFIG).eval()


def _random_adapter(unet: torch.nn.Module, folder: Path, seed: int, targets=("to_q", "to_k", "to_v", "to_out.0")) -> Path:
    """An adapter with random A and B (B starts at zero in training), written by svd-fast train's save_lora."""
    adapted = copy.deepcopy(unet)
    config = lora_config(RANK, ALPHA, 0.0, list(targets))
    add_lora(adapted, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return save_lora(adapted, config, folder)


def _inputs(unet, frames: int = 2) -> tuple:
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(1, frames, unet.config.in_channels, 8, 8, generator=generator),
        torch.tensor([0.3]),
        torch.randn(1, 1, unet.config.cross_attention_dim, generator=generator),
        torch.tensor([[6.0, 127.0, 0.02]]),
    )


def _run(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(*inputs).sample


def _peft_merged(base, path: Path, scale: float) -> torch.nn.Module:
    """The merged export at ``scale``: peft's layers with their scale set, folded by peft's merge."""
    from peft.tuners.lora import LoraLayer

    unet = copy.deepcopy(base)
    load_lora_as_peft(unet, path.parent)
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", scale)
    return merge_lora(unet).eval()


@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_adapter_equals_merged_export_fused_and_unfused_and_unfuse_is_exact(base, tmp_path: Path, scale: float) -> None:
    path = _random_adapter(base, tmp_path / "lora", seed=2)
    inputs = _inputs(base)
    expected = _run(_peft_merged(base, path, scale), inputs)
    base_out = _run(base, inputs)
    unet = copy.deepcopy(base)
    original = {key: value.clone() for key, value in unet.state_dict().items()}
    name = svd_fast.load_lora(unet, tmp_path, scale=scale)  # the run folder: its lora/ subfolder is found
    # fp32: W + s B A in another order than peft's merge, a few ulps per weight; a wrong scale is off by > 1e-2.
    torch.testing.assert_close(_run(unet, inputs), expected, rtol=1e-5, atol=1e-5)
    assert (expected - base_out).abs().max() > 1e-2  # the adapter matters
    info = svd_fast.lora_adapters(unet)
    assert info["fused"] and info["adapters"][name]["scale"] == scale
    adapted_weights = [key for key in original if any(f".{t}.weight" in key for t in ("to_q", "to_k", "to_v", "to_out.0")) and ".attn" in key]
    assert info["backup_bytes"] == sum(original[key].numel() * 4 for key in adapted_weights) > 0

    svd_fast.unfuse_lora(unet)
    assert all(torch.equal(value, original[key]) for key, value in unet.state_dict().items())  # bit-exact
    # Hooks add s * scaling * B(A x) to each projection: the unmerged computation, fp32 rounding apart.
    torch.testing.assert_close(_run(unet, inputs), expected, rtol=1e-5, atol=1e-5)
    svd_fast.fuse_lora(unet)
    torch.testing.assert_close(_run(unet, inputs), expected, rtol=1e-5, atol=1e-5)
    svd_fast.unload_lora(unet)
    assert all(torch.equal(value, original[key]) for key, value in unet.state_dict().items())
    assert torch.equal(_run(unet, inputs), base_out) and svd_fast.lora_adapters(unet) == {}


def test_two_adapters_add_up_with_their_scales_in_every_layout(base, tmp_path: Path) -> None:
    first = _random_adapter(base, tmp_path / "first", seed=3)
    second = _random_adapter(base, tmp_path / "second", seed=4, targets=("to_v",))
    # The second as diffusers' pipeline-level save_lora_weights writes it (unet. prefix), in a bare file without
    # metadata (scaling 1 then), and the first as peft's save_pretrained (base_model.model. prefix + adapter_config.json).
    weights = load_file(second)
    save_file({f"unet.{key}": value for key, value in weights.items()}, tmp_path / "second.safetensors")
    peft_folder = tmp_path / "peft"
    peft_folder.mkdir()
    save_file({f"base_model.model.{key}": value for key, value in load_file(first).items()}, peft_folder / "adapter_model.safetensors")
    (peft_folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA, "peft_type": "LORA"}))

    unet = copy.deepcopy(base)
    svd_fast.load_lora(unet, peft_folder, scale=0.5, adapter_name="first")
    svd_fast.load_lora(unet, tmp_path / "second.safetensors", scale=-1.5, adapter_name="second")
    # Independent expectation: W + sum_i scale_i scaling_i B_i A_i in float64, per adapted weight.
    expected = {key: value.double() for key, value in base.state_dict().items()}
    for adapter, factor in ((load_file(first), 0.5 * ALPHA / RANK), (weights, -1.5)):
        for key in adapter:
            if ".lora_A." in key:
                module = key.split(".lora_A.")[0]
                b, a = adapter[f"{module}.lora_B.weight"].double(), adapter[key].double()
                expected[f"{module}.weight"] += factor * b @ a
    state = unet.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(state[key].double(), value, rtol=0, atol=1e-6)  # fp32 storage of a float64 sum
    fused_out = _run(unet, _inputs(base))
    svd_fast.unfuse_lora(unet)
    torch.testing.assert_close(_run(unet, _inputs(base)), fused_out, rtol=1e-5, atol=1e-5)
    svd_fast.set_lora_scale(unet, "second", 0.0)  # only the first left in effect
    svd_fast.unload_lora(unet, "second")
    svd_fast.fuse_lora(unet)
    only_first = copy.deepcopy(base)
    svd_fast.load_lora(only_first, first, scale=0.5)
    assert all(torch.equal(v, only_first.state_dict()[k]) for k, v in unet.state_dict().items())
    with pytest.raises(ValueError, match="adapter_name: 'first' is already loaded"):
        svd_fast.load_lora(unet, first, adapter_name="first")


def test_adapter_on_an_optimized_unet_reaches_the_fused_temporal_block_and_survives_restore(base, tmp_path: Path) -> None:
    from svd_fast.diffusers.temporal_transformer_block import FusedTemporalBasicTransformerBlock

    path = _random_adapter(base, tmp_path / "lora", seed=5)
    inputs = _inputs(base, frames=4)
    reference = copy.deepcopy(base)
    svd_fast.load_lora(reference, path, scale=0.7)
    expected = _run(reference, inputs)
    unet = copy.deepcopy(base)
    original = {key: value.clone() for key, value in unet.state_dict().items()}
    svd_fast.optimize(unet, backend="cpu")
    svd_fast.load_lora(unet, path, scale=0.7)
    blocks = [m for m in unet.modules() if isinstance(m, FusedTemporalBasicTransformerBlock)]
    assert blocks and not torch.equal(blocks[0].attn1.to_q.weight, original[_param_name(unet, blocks[0].attn1.to_q.weight)])
    # optimize()'s own tolerance (test_optimize: same fp32 math in another order).
    torch.testing.assert_close(_run(unet, inputs), expected, rtol=1e-4, atol=1e-5)
    for fuse in (False, True):  # as hooks, then fused again: the fused block calls the hooked projections
        (svd_fast.fuse_lora if fuse else svd_fast.unfuse_lora)(unet)
        torch.testing.assert_close(_run(unet, inputs), expected, rtol=1e-4, atol=1e-5)
    svd_fast.restore(unet)
    assert not any(isinstance(m, FusedTemporalBasicTransformerBlock) for m in unet.modules())
    torch.testing.assert_close(_run(unet, inputs), expected, rtol=1e-5, atol=1e-6)
    svd_fast.unload_lora(unet)
    assert all(torch.equal(value, original[key]) for key, value in unet.state_dict().items())


def _param_name(module: torch.nn.Module, tensor: torch.Tensor) -> str:
    return next(name for name, p in module.named_parameters() if p is tensor)


def _one_line_error(unet, path, match: str) -> None:
    before = {key: value.clone() for key, value in unet.state_dict().items()}
    with pytest.raises(ValueError, match=match) as error:
        svd_fast.load_lora(unet, path)
    assert "\n" not in str(error.value)
    assert all(torch.equal(value, before[key]) for key, value in unet.state_dict().items())  # nothing changed


def test_bad_adapters_are_one_line_errors_naming_the_problem(base, tmp_path: Path) -> None:
    unet = copy.deepcopy(base)
    good = _random_adapter(base, tmp_path / "lora", seed=6)
    weights = load_file(good)
    _one_line_error(unet, tmp_path / "missing", "does not exist")
    (tmp_path / "empty").mkdir()
    _one_line_error(unet, tmp_path / "empty", "holds none of")
    save_file({"conv_in.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    _one_line_error(unet, tmp_path / "model.safetensors", "holds no LoRA weights")
    (tmp_path / "notes.safetensors").write_text("not a tensor file")
    _one_line_error(unet, tmp_path / "notes.safetensors", "is not a safetensors file")
    save_file({**weights, "down_blocks.9.attn1.to_q.lora_A.weight": torch.zeros(RANK, 64),
               "down_blocks.9.attn1.to_q.lora_B.weight": torch.zeros(64, RANK)}, tmp_path / "other_model.safetensors")  # fmt: skip
    _one_line_error(unet, tmp_path / "other_model.safetensors", r"1 module\(s\) this UNet lacks \(e.g. 'down_blocks.9.attn1.to_q'\)")
    key = next(k for k in weights if k.endswith(".lora_A.weight"))
    wider = {**weights, key: torch.zeros(RANK, weights[key].shape[1] * 2)}
    save_file(wider, tmp_path / "wider.safetensors")
    _one_line_error(unet, tmp_path / "wider.safetensors", "an adapter for another model size")
    rank_four = {k: torch.zeros(4, v.shape[1]) if k.endswith(".lora_A.weight") else torch.zeros(v.shape[0], 4) for k, v in weights.items()}
    metadata = {"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": ALPHA})}
    save_file(rank_four, tmp_path / "rank.safetensors", metadata=metadata)
    _one_line_error(unet, tmp_path / "rank.safetensors", "has rank 4 but its LoraConfig says r=2")
    save_file({k: v for k, v in weights.items() if k != key}, tmp_path / "half.safetensors")
    _one_line_error(unet, tmp_path / "half.safetensors", "has lora_B but no lora_A")
    with pytest.raises(ValueError, match="scale must be a finite number"):
        svd_fast.load_lora(unet, good, scale=float("nan"))
    with pytest.raises(ValueError, match="no LoRA adapter loaded"):
        svd_fast.unfuse_lora(unet)
    with pytest.raises(TypeError, match="target must be"):
        svd_fast.load_lora("unet", good)
