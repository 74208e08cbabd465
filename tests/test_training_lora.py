"""LoRA training (trained_parameters: lora): the adapters' parameter count and placement, gradients only on them,
a loss that falls as they train, DeepSpeed ZeRO-2 training with an exact resume, the exported adapter (diffusers'
LoRA file format) reproducing the trained UNet, the merged export, the memory plan, and config errors. CPU, tiny
model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from training_fixtures import tiny_config, workdir_fixture

from svd_fast.diffusers.tiny import TINY_NUM_FRAMES, TINY_UNET_CONFIG, tiny_pipeline
from svd_fast.training import ObjectiveConfig, TrainConfig, edm_loss, encode_batch, train
from svd_fast.training.lora import LORA_TARGETS, add_lora, load_lora, merge_lora

workdir = workdir_fixture("training_lora")

RANK = 2


def _lora(rank: int = RANK, **overrides):
    return TrainConfig.from_dict({"trained_parameters": "lora", "lora": {"rank": rank, **overrides}}).peft_lora()


def _expected_lora_parameters(unet: torch.nn.Module, rank: int, targets=LORA_TARGETS, layers: str = "all") -> int:
    """rank x (in + out) for every attention projection (to_q/to_k of self-attention only), counted from the base
    UNet's own modules."""
    total = 0
    for name, module in unet.named_modules():
        if not (isinstance(module, torch.nn.Linear) and any(name.endswith(f".{target}") for target in targets)):
            continue
        temporal = "temporal_transformer_blocks" in name
        if layers == "all" or (layers == "temporal") == temporal:
            if ".attn1." in name or (".attn2." in name and not name.endswith((".to_q", ".to_k"))):
                total += rank * (module.in_features + module.out_features)
    return total


def _unet_inputs(unet, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    return dict(
        sample=torch.randn(1, TINY_NUM_FRAMES, config.in_channels, 8, 8, generator=generator),
        timestep=torch.tensor([0.3]),
        encoder_hidden_states=torch.randn(1, 1, config.cross_attention_dim, generator=generator),
        added_time_ids=torch.tensor([[6.0, 127.0, 0.02]]),
    )


def test_lora_adapts_every_attention_projection_and_only_its_parameters_learn() -> None:
    pipe = tiny_pipeline(seed=0)
    unet = pipe.unet
    expected = _expected_lora_parameters(unet, RANK)
    inputs = _unet_inputs(unet)
    with torch.no_grad():
        base_out = unet(**inputs).sample
    trained = add_lora(unet, _lora())
    names = [name for name, p in unet.named_parameters() if p.requires_grad]
    assert trained == expected == sum(p.numel() for p in unet.parameters() if p.requires_grad) > 0
    assert all(".lora_A." in name or ".lora_B." in name for name in names)
    assert any("temporal_transformer_blocks" in name for name in names) and any(".attn2.to_v." in name for name in names)
    with torch.no_grad():  # lora_B starts at zero: the adapted UNet is the base UNet (to fp32 rounding of peft's forward)
        torch.testing.assert_close(unet(**inputs).sample, base_out, rtol=1e-5, atol=1e-5)

    # A fixed batch, a few Adam steps on the adapters: the loss falls, frozen weights get no gradient and stay.
    pixels = torch.rand(2, TINY_NUM_FRAMES, 3, 64, 64) * 2 - 1
    objective = ObjectiveConfig(p_mean=0.0, p_std=0.05, drop_image_embedding=0.0, drop_both=0.0, drop_cond_latent=0.0)
    batch = encode_batch(pixels, torch.tensor([7.0, 7.0]), torch.tensor([127.0, 127.0]), pipe.vae, pipe.image_encoder,
                         pipe.feature_extractor, objective, torch.Generator().manual_seed(0))
    frozen_before = {name: p.detach().clone() for name, p in unet.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.Adam([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss, _ = edm_loss(unet, batch)
        loss.backward()
        assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)
        assert any(p.grad.abs().sum() > 0 for name, p in unet.named_parameters() if ".lora_B." in name)  # A gets none while B = 0
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(p, frozen_before[name]) for name, p in unet.named_parameters() if not p.requires_grad)

    # Only the query projections: fewer parameters, counted the same way.
    only_q = tiny_pipeline(seed=0).unet
    expected_q = _expected_lora_parameters(only_q, 3, ("to_q",))
    assert 0 < expected_q < expected and add_lora(only_q, _lora(rank=3, target_modules=["to_q"])) == expected_q


@pytest.mark.parametrize("layers", ["all", "temporal", "spatial"])
def test_every_default_adapter_learns_and_lora_layers_selects_temporal_or_spatial(layers: str) -> None:
    """Cross-attention attends to one image token, so adapters on its to_q/to_k would get an identically zero
    gradient forever: the defaults leave them out, and after one step every adapter (A and B) has a gradient."""
    pipe = tiny_pipeline(seed=0)
    unet = pipe.unet
    count = add_lora(unet, _lora(layers=layers))
    assert count == _expected_lora_parameters(tiny_pipeline(seed=0).unet, RANK, layers=layers) > 0
    names = [name for name, p in unet.named_parameters() if p.requires_grad]
    assert not any(".attn2.to_q." in name or ".attn2.to_k." in name for name in names)
    temporal = [("temporal_transformer_blocks" in name) for name in names]
    assert {"all": any(temporal) and not all(temporal), "temporal": all(temporal), "spatial": not any(temporal)}[layers]
    pixels = torch.rand(1, TINY_NUM_FRAMES, 3, 64, 64) * 2 - 1
    objective = ObjectiveConfig(drop_image_embedding=0.0, drop_both=0.0, drop_cond_latent=0.0)
    batch = encode_batch(pixels, torch.tensor([7.0]), torch.tensor([127.0]), pipe.vae, pipe.image_encoder, pipe.feature_extractor,
                         objective, torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # B starts at zero (A gets no gradient then); after one step both do
        optimizer.zero_grad()
        edm_loss(unet, batch)[0].backward()
        optimizer.step()
    zero = [name for name, p in unet.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0]
    assert not zero, zero



def test_cross_attention_query_adapters_get_no_gradient_so_naming_them_is_refused() -> None:
    """The counterfactual of the defaults: adapters on cross-attention's to_q get zero gradient (exactly, up to the
    float rounding of attention's backward: about 1e-10 against 1e-2 on its to_v)."""
    pipe = tiny_pipeline(seed=0)
    from peft import LoraConfig

    add_lora(pipe.unet, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=r".*\.attn2\.to_[qv]", init_lora_weights=False))
    pixels = torch.rand(1, TINY_NUM_FRAMES, 3, 64, 64) * 2 - 1
    objective = ObjectiveConfig(drop_image_embedding=0.0, drop_both=0.0, drop_cond_latent=0.0)
    batch = encode_batch(pixels, torch.tensor([7.0]), torch.tensor([127.0]), pipe.vae, pipe.image_encoder, pipe.feature_extractor,
                         objective, torch.Generator().manual_seed(0))
    edm_loss(pipe.unet, batch)[0].backward()
    largest = {name: p.grad.abs().max().item() for name, p in pipe.unet.named_parameters() if p.requires_grad}
    query = max(value for name, value in largest.items() if ".to_q." in name)
    assert query < 1e-6 * max(value for name, value in largest.items() if ".to_v." in name), largest
    with pytest.raises(ValueError, match="cross-attention"):
        _lora(target_modules=["to_v", "attn2.to_q"])


def test_lora_trains_with_zero2_resumes_exactly_and_exports_a_loadable_adapter(workdir: Path) -> None:
    common = {"trained_parameters": "lora", "lora": {"rank": RANK, "alpha": 4.0, "dropout": 0.1}, "optimizer.learning_rate": 1e-2,
              "max_steps": 4, "ema_decay": 0.7, "logging.export": True, "logging.export_ema": False, "use_svd_fast_kernels": False}
    full = train(tiny_config(workdir, "lora_full", **{"logging.checkpoint_every": 2, **common}))
    resumed = train(tiny_config(workdir, "lora_resumed", resume_from=str(workdir / "lora_full" / "checkpoints" / "step_2"), **common))
    assert resumed.losses == full.losses  # dropout masks too: the RNG state is restored
    ema_full = torch.load(workdir / "lora_full" / "checkpoints" / "step_4" / "ema_rank0.pt", weights_only=True)
    ema_resumed = torch.load(workdir / "lora_resumed" / "checkpoints" / "step_4" / "ema_rank0.pt", weights_only=True)
    assert ema_full["values"] and all(".lora_" in key for key in ema_full["values"])  # the EMA covers the adapters only
    assert all(torch.equal(ema_full["values"][key], ema_resumed["values"][key]) for key in ema_full["values"])

    from diffusers import UNetSpatioTemporalConditionModel
    from safetensors.torch import load_file

    adapter = workdir / "lora_full" / "lora"
    weights = load_file(adapter / "pytorch_lora_weights.safetensors")
    resumed_weights = load_file(workdir / "lora_resumed" / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(weights[key], resumed_weights[key]) for key in weights)
    assert all(".lora_A.weight" in key or ".lora_B.weight" in key for key in weights)  # peft's keys, adapter name removed

    # The trained UNet: the base UNet with the adapters and the final checkpoint's weights (fp32 run: the module's
    # weights are the masters).
    from svd_fast.training.checkpoint import safe_load

    module_state = safe_load(workdir / "lora_full" / "checkpoints" / "step_4" / "mp_rank_00_model_states.pt")["module"]
    trained = UNetSpatioTemporalConditionModel.from_pretrained(workdir / "tiny", subfolder="unet")
    add_lora(trained, _lora(alpha=4.0, dropout=0.1))
    trained.load_state_dict(module_state)
    loaded = UNetSpatioTemporalConditionModel.from_pretrained(workdir / "tiny", subfolder="unet")
    load_lora(loaded, adapter)
    merged = UNetSpatioTemporalConditionModel.from_pretrained(workdir / "lora_full" / "pipeline", subfolder="unet")
    base = UNetSpatioTemporalConditionModel.from_pretrained(workdir / "tiny", subfolder="unet")
    inputs = _unet_inputs(base, seed=1)
    with torch.no_grad():
        outputs = {name: model.eval()(**inputs).sample for name, model in
                   (("trained", trained), ("loaded", loaded), ("merged", merged), ("base", base))}
    assert torch.equal(outputs["loaded"], outputs["trained"])
    torch.testing.assert_close(outputs["merged"], outputs["trained"], rtol=1e-5, atol=1e-5)  # W + s B A folded: fp32 rounding
    assert (outputs["trained"] - outputs["base"]).abs().max() > 1e-4  # the adapters were trained
    assert not any(".lora_" in name for name, _ in merged.named_parameters())
    # peft's own loader reads the same adapter (peft's layout beside diffusers'): the trained UNet's outputs.
    from peft import PeftModel

    peft_unet = PeftModel.from_pretrained(UNetSpatioTemporalConditionModel.from_pretrained(workdir / "tiny", subfolder="unet"), adapter)
    with torch.no_grad():
        torch.testing.assert_close(peft_unet.eval()(**inputs).sample, outputs["trained"], rtol=1e-5, atol=1e-5)
    import svd_fast

    generation_unet = UNetSpatioTemporalConditionModel.from_pretrained(workdir / "tiny", subfolder="unet")
    svd_fast.load_lora(generation_unet, adapter / "adapter_model.safetensors")  # the peft-layout file, read by generation
    with torch.no_grad():
        torch.testing.assert_close(generation_unet.eval()(**inputs).sample, outputs["trained"], rtol=1e-5, atol=1e-5)
    card = (adapter / "README.md").read_text()
    assert "base_model:" in card and str(workdir / "tiny") in card and "licence" in card.lower() and '"rank": 2' in card
    assert "SHA-256 of the training data" in card and (workdir / "lora_full" / "pipeline" / "README.md").is_file()
    with torch.no_grad():  # merge_lora of the loaded adapter gives the exported UNet
        torch.testing.assert_close(merge_lora(loaded).eval()(**inputs).sample, outputs["merged"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [({"lora.rank": 0}, "lora.rank"), ({"lora.rank": -2}, "lora.rank"), ({"lora.target_modules": ["to_qq"]}, "lora.target_modules"),
     ({"lora.target_modules": []}, "lora.target_modules"), ({"lora.alpha": 0}, "lora.alpha"), ({"lora.dropout": 1.0}, "lora.dropout"),
     ({"trained_parameters": "adapters"}, "trained_parameters"), ({"lora_rank": 0}, "lora_rank (now lora.rank)"),
     ({"lora.layers": "motion"}, "lora.layers"), ({"lora.target_modules": ["attn2.to_k"]}, "lora.target_modules"),
     ({"lora_layers": "motion"}, "lora_layers (now lora.layers)")],
)
def test_bad_lora_config_is_one_line_naming_the_key(workdir: Path, overrides: dict, key: str, capsys) -> None:
    from svd_fast import cli

    with pytest.raises(ValueError, match=re.escape(key)):
        TrainConfig.from_dict(tiny_config(workdir, "bad", **{"trained_parameters": "lora", **overrides}))
    config = workdir / "lora_bad.json"
    config.write_text(json.dumps(tiny_config(workdir, "bad", trained_parameters="lora")))
    arguments = [item for name, value in overrides.items() for item in ("--set", f"{name}={json.dumps(value)}")]
    assert cli.main(["train", "--config", str(config), *arguments]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("svd-fast train: error: ") and key in lines[0], lines


def test_memory_plan_counts_lora_states_and_traces_lora_activations() -> None:
    from svd_fast.training import memory_plan

    unet_kwargs = dict(TINY_UNET_CONFIG, num_frames=TINY_NUM_FRAMES)
    lora = _lora()
    trained, frozen, _ = memory_plan.parameter_counts(unet_kwargs, "lora", lora)
    full_trained, _, _ = memory_plan.parameter_counts(unet_kwargs, "full")
    assert trained == _expected_lora_parameters(tiny_pipeline(seed=0).unet, RANK) and frozen == full_trained
    # Frozen layers keep no inputs for weight gradients: fewer activations than training everything.
    full = memory_plan.traced_activation_bytes(unet_kwargs, TINY_NUM_FRAMES, (8, 8), 1, torch.bfloat16, "none")
    adapted = memory_plan.traced_activation_bytes(unet_kwargs, TINY_NUM_FRAMES, (8, 8), 1, torch.bfloat16, "none", lora)
    assert 0 < adapted < full
    config = TrainConfig.from_dict({"trained_parameters": "lora", "ema_decay": 0.9, "lora": {"rank": RANK},
                                    "data": {"num_frames": TINY_NUM_FRAMES, "height": 64, "width": 64}})
    plan = memory_plan.plan_memory(config, unet_kwargs=unet_kwargs)
    assert plan.trained_params == trained and plan.trained_parameters == "lora"
    assert plan.ema_gib == pytest.approx(4 * trained / 2**30, abs=0.01)
