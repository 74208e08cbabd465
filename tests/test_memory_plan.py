"""The memory plan: the traced activation estimate against a real CPU measurement (peak RSS of a fresh process,
within 15%), model states equal to DeepSpeed's estimators, the `svd-fast train --plan-memory` JSON and its rows
(VAE encoding and validation traced at their chunk sizes, ZeRO buckets and ZeRO-3 gathered parameters from the
config or its DeepSpeed JSON), chunked encoding equal to encoding at once, and every shipped GPU config planned
at least 10% under its target_gpu_gib."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from utils import assert_within_torch_error

from svd_fast.diffusers.tiny import TINY_UNET_CONFIG, TINY_VAE_CONFIG
from svd_fast.training import TrainConfig, memory_plan
from svd_fast.training.config import DataSection, DeepSpeedSection, ValidationSection
from svd_fast.training.objective import encode_posterior
from svd_fast.training.setup import derived_deepspeed_config

REPO = Path(__file__).resolve().parents[1]
FRAMES, LATENT_HW = 8, (24, 24)
TINY_CONFIG = dict(TINY_UNET_CONFIG, num_frames=8)

# Peak resident memory of one real forward + backward, over the resident memory just before it. The warm-up
# pass (1 frame, 8x8) starts torch's thread pools and kernels; clear_refs resets the kernel's high-water mark;
# a low mmap threshold makes freed tensors leave the resident set, so the high-water mark is the live peak.
REAL_MEASUREMENT = textwrap.dedent("""
    import json, sys, torch
    from diffusers import UNetSpatioTemporalConditionModel
    config, frames, height, width, mode = json.loads(sys.argv[1])
    from svd_fast.training.activation_checkpointing import enable_activation_checkpointing
    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(**config).train()
    enable_activation_checkpointing(unet, mode)
    for p in unet.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    def step(f, h, w):
        x = torch.randn(1, f, unet.config.in_channels, h, w)
        e = torch.randn(1, 1, unet.config.cross_attention_dim)
        out = unet(x, torch.ones(1), encoder_hidden_states=e, added_time_ids=torch.randn(1, 3), return_dict=False)[0]
        out.float().square().mean().backward()
    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
    step(1, 8, 8)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    step(frames, height, width)
    print(json.dumps(status("VmHWM:") - before))
""")


@pytest.mark.parametrize("mode", ["none", "all"])
def test_traced_activations_match_a_real_cpu_measurement(mode: str) -> None:
    config = dict(TINY_UNET_CONFIG, num_frames=FRAMES)
    traced = memory_plan.traced_activation_bytes(config, FRAMES, LATENT_HW, 1, torch.float32, mode)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run([sys.executable, "-c", REAL_MEASUREMENT, json.dumps([config, FRAMES, *LATENT_HW, mode])],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    assert traced == pytest.approx(measured, rel=0.15), (traced, measured)


def test_model_states_are_deepspeeds_estimates() -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, largest = 1_524_623_082, 6_553_600
    zero2 = DeepSpeedSection(zero_stage=2)
    assert memory_plan.model_states_bytes(zero2, total, largest, 8) == estimate_zero2_model_states_mem_needs(total, 8, cpu_offload=False)[1]
    zero3 = DeepSpeedSection(zero_stage=3, offload_optimizer="cpu")
    expected = estimate_zero3_model_states_mem_needs(total, largest, 8, cpu_offload=True, cpu_offload_params=False)[1]
    assert memory_plan.model_states_bytes(zero3, total, largest, 8) == expected


def _fake_traces(monkeypatch, activations: float = 10, encode: float = 2, sampling: float = 3, decode: float = 4) -> None:
    """Traces replaced by fixed sizes (GiB): the CLI, keys and sums, without the full-size traces."""
    monkeypatch.setattr(memory_plan, "traced_activation_bytes", lambda *args: activations * memory_plan.GIB)
    monkeypatch.setattr(memory_plan, "traced_sampling_step_bytes", lambda *args: sampling * memory_plan.GIB)
    monkeypatch.setattr(memory_plan, "traced_vae_bytes", lambda *args: (decode if args[-1] is True else encode) * memory_plan.GIB)


def test_plan_memory_cli_json(tmp_path: Path, monkeypatch, capsys) -> None:
    from svd_fast import cli

    _fake_traces(monkeypatch)
    config = tmp_path / "plan.yaml"
    config.write_text("model: not/needed\nema_decay: 0.9999\ndata:\n  path: not/needed\n  num_frames: 25\n  height: 576\n  width: 1024\n"
                      "deepspeed:\n  zero_stage: 3\ntarget_gpu_gib: 40\n")
    assert cli.main(["train", "--plan-memory", "--config", str(config), "--gpus", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    static = ("model_states_gib", "ema_gib", "frozen_encoders_gib", "zero_buffers_gib", "cuda_context_gib", "nccl_gib", "workspaces_gib",
              "fragmentation_gib")  # fmt: skip
    for key in (*static, "per_gpu_peak_gib", "activations_gib", "vae_encode_gib", "validation_gib", "overhead_gib", "zero_stage", "gpus"):
        assert key in plan
    assert plan["gpus"] == 8 and plan["zero_stage"] == 3 and plan["activations_gib"] == 10.0 and plan["vae_encode_gib"] == 2.0
    assert plan["vae_params"] == 97_742_847  # SVD's AutoencoderKLTemporalDecoder (SD's AutoencoderKL has 83,653,863)
    assert plan["validation"] is False and plan["vae_encode_chunk"] == 7  # a quarter of 25 frames, rounded up
    # The transients come one after another: the largest (the UNet's 10 GiB) is in the peak, validation is off.
    assert plan["per_gpu_peak_gib"] == pytest.approx(sum(plan[key] for key in static) + 10.0, abs=0.05)
    assert plan["fragmentation_gib"] == pytest.approx(0.1 * (plan["model_states_gib"] + 10.0), abs=0.01)
    assert plan["margin"] == pytest.approx(1 - plan["per_gpu_peak_gib"] / 40, abs=1e-3)
    assert plan["ema_gib"] == pytest.approx(4 * plan["trained_params"] / 8 / 2**30, abs=0.01)
    # ZeRO-3 at DeepSpeed's defaults: 5e8 reduce + 5e7 prefetch bucket + 1e9 gathered parameters, 16-bit.
    assert plan["zero_buffers_gib"] == pytest.approx(2 * (5e8 + 5e7 + 1e9) / 2**30, abs=0.01)
    assert cli.main(["train", "--plan-memory", "--config", str(config), "--gpus", "0"]) == 2


def test_validation_and_encoding_rows_enter_the_peak_at_their_chunk_sizes(monkeypatch) -> None:
    _fake_traces(monkeypatch, activations=10, encode=12, sampling=3, decode=14)
    plan = memory_plan.plan_memory(TrainConfig(data=DataSection(num_frames=25), ema_decay=0.0))
    assert plan.vae_encode_gib == 12.0 and plan.per_gpu_peak_gib > 12.0 + plan.model_states_gib  # encoding is the largest here
    # The sampling copy: the UNet and the VAE in the training precision, plus the larger of a sampling step and a decode.
    copies = (plan.trained_params * 2 + plan.vae_params * 2) / 2**30
    assert plan.validation_gib == pytest.approx(copies + 14.0, abs=0.01)
    validated = memory_plan.plan_memory(TrainConfig(data=DataSection(num_frames=25), ema_decay=0.0, validation=ValidationSection(
        every=10, images=["x.png"], decode_chunk=5)))  # fmt: skip
    assert validated.validation and validated.validation_decode_chunk == 5
    assert validated.per_gpu_peak_gib > plan.per_gpu_peak_gib  # 17 GiB of validation over 12 of encoding


def test_vae_rows_are_traced_at_their_chunk() -> None:
    """The traced VAE encode grows by the same step with every added frame of a chunk; its decode likewise."""
    peaks = [memory_plan.traced_vae_bytes(8, (64, 64), torch.bfloat16, chunk) for chunk in (1, 2, 3, 4)]
    steps = [after - before for before, after in zip(peaks, peaks[1:])]
    assert steps[0] > 0 and steps == pytest.approx([steps[0]] * 3, rel=0.05), peaks
    decode = [memory_plan.traced_vae_bytes(8, (64, 64), torch.bfloat16, chunk, True) for chunk in (2, 4, 8)]
    assert decode[0] < decode[1] < decode[2]
    plans = [memory_plan.plan_memory(TrainConfig(data=DataSection(num_frames=8, height=64, width=64, vae_encode_chunk=chunk)), unet_kwargs=TINY_CONFIG)
             for chunk in (2, 4)]  # fmt: skip
    assert plans[0].vae_encode_gib < plans[1].vae_encode_gib
    precomputed = memory_plan.plan_memory(TrainConfig(data=DataSection(num_frames=8, height=64, width=64, latents_dir="latents")), unet_kwargs=TINY_CONFIG)
    assert precomputed.vae_encode_gib < plans[0].vae_encode_gib  # only the conditioning frame


def test_chunked_encoding_equals_encoding_at_once() -> None:
    """SVD's VAE encoder sees each frame alone, so chunks change nothing but the batch its kernels see: the
    chunked fp32 posterior is within the rule of tests/utils.py (2x PyTorch's own error against float64)."""
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(**TINY_VAE_CONFIG).eval()
    images = torch.rand(7, 3, 64, 64) * 2 - 1
    at_once = encode_posterior(images, vae)
    chunked = encode_posterior(images, vae, chunk=3)
    truth = encode_posterior(images.double(), vae.double())
    for out, reference, exact, name in zip(chunked, at_once, truth, ("mean", "std")):
        assert out.shape == reference.shape == (7, TINY_VAE_CONFIG["latent_channels"], 32, 32)
        assert_within_torch_error(out, exact, reference, torch.float32, what=name)


def test_zero_settings_come_from_the_config_or_its_deepspeed_json(tmp_path: Path) -> None:
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1e8, "reduce_bucket_size": "auto"}}))
    config = TrainConfig.from_dict({"deepspeed": {"config": str(ds_json), "stage3_prefetch_bucket_size": 20_000_000}})
    deepspeed = config.deepspeed
    assert deepspeed.zero_stage == 3 and deepspeed.stage3_max_live_parameters == 100_000_000 and deepspeed.reduce_bucket_size is None
    zero = derived_deepspeed_config(deepspeed, config.optimizer, config.data.batch_size, config.precision)["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 20_000_000 and "reduce_bucket_size" not in zero  # DeepSpeed's default
    total = 1_524_623_082
    assert memory_plan.zero_buffer_bytes(config, total, total) == 2 * (500_000_000 + 20_000_000 + 100_000_000)
    # Buckets hold the trained parameters' gradients: LoRA's few adapters never fill DeepSpeed's default buckets.
    assert memory_plan.zero_buffer_bytes(TrainConfig(deepspeed=DeepSpeedSection(zero_stage=2)), 6_000_000, total) == 2 * 2 * 6_000_000
    with pytest.raises(ValueError, match="deepspeed.stage3_max_live_parameters"):
        DeepSpeedSection(stage3_max_live_parameters=0)
    # The flat keys of earlier configs still load, into their sections.
    flat = TrainConfig.from_dict({"stage3_max_live_parameters": 7, "vae_encode_chunk": 3, "validation_decode_chunk": 2})
    assert (flat.deepspeed.stage3_max_live_parameters, flat.encode_chunk(), flat.decode_chunk()) == (7, 3, 2)


def _trace_cache(monkeypatch) -> None:
    """Traces kept under build/, keyed by the code they run and the versions of the packages they trace."""
    folder = REPO / "build" / "memory_plan_traces"
    code = b"".join((REPO / "svd_fast" / "training" / name).read_bytes()
                    for name in ("memory_plan.py", "activation_checkpointing.py", "lora.py", "objective.py", "setup.py"))  # fmt: skip
    versions = [importlib.metadata.version(name) for name in ("torch", "diffusers", "peft", "deepspeed")]
    traced = memory_plan._traced

    def cached(name: str, *args):
        key = hashlib.sha256(code + repr((versions, name, args)).encode()).hexdigest()[:24]
        path = folder / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        value = traced(name, *args)
        folder.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(value))
        os.replace(temporary, path)
        return value

    monkeypatch.setattr(memory_plan, "_traced", cached)


@pytest.mark.slow
def test_every_shipped_gpu_config_plans_ten_percent_under_its_target(monkeypatch) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import memory_plans

    _trace_cache(monkeypatch)
    for path in sorted((REPO / "configs").glob("train_*.yaml")):
        config = TrainConfig.from_file(path)
        if config.device == "cpu":
            assert config.target_gpu_gib is None, path.name
            continue
        assert config.target_gpu_gib is not None, f"{path.name} names no target_gpu_gib"
        for planned in (config, memory_plans.with_validation(config)):
            plan = memory_plan.plan_memory(planned, memory_plans.gpus_of(path))
            assert plan.per_gpu_peak_gib <= 0.9 * config.target_gpu_gib, (path.name, plan.validation, plan.per_gpu_peak_gib)
            assert plan.vae_encode_gib <= plan.activations_gib, path.name  # the default chunk's promise


def test_temporal_only_training_counts_the_temporal_layers() -> None:
    config = {"num_frames": 25}
    full_trained, full_frozen, _ = memory_plan.parameter_counts(config, "full")
    temporal_trained, temporal_frozen, _ = memory_plan.parameter_counts(config, "temporal")
    assert full_frozen == 0 and full_trained == temporal_trained + temporal_frozen
    assert 0.2 < temporal_trained / full_trained < 0.5  # SVD's temporal layers: roughly a third of the UNet
