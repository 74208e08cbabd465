"""The memory plan: the traced activation estimate against a real CPU measurement (peak RSS of a fresh process,
within 15%), model states equal to DeepSpeed's estimators, and the `svd-fast train --plan-memory` JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from svd_fast.diffusers.tiny import TINY_UNET_CONFIG
from svd_fast.training import memory_plan
from svd_fast.training.config import DeepSpeedSection

REPO = Path(__file__).resolve().parents[1]
FRAMES, LATENT_HW = 8, (24, 24)

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


def test_plan_memory_cli_json(tmp_path: Path, monkeypatch, capsys) -> None:
    from svd_fast import cli

    # The full-size trace is exercised by the shipped-config plans (notes); here the CLI, keys and sums.
    monkeypatch.setattr(memory_plan, "traced_activation_bytes", lambda *args: 10 * memory_plan.GIB)
    config = tmp_path / "plan.yaml"
    config.write_text("model: not/needed\nema_decay: 0.9999\ndata:\n  path: not/needed\n  num_frames: 25\n  height: 576\n  width: 1024\n"
                      "deepspeed:\n  zero_stage: 3\n")
    assert cli.main(["train", "--plan-memory", "--config", str(config), "--gpus", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for key in ("per_gpu_peak_gib", "model_states_gib", "ema_gib", "activations_gib", "overhead_gib", "zero_stage", "gpus"):
        assert key in plan
    assert plan["gpus"] == 8 and plan["zero_stage"] == 3 and plan["activations_gib"] == 10.0
    parts = plan["model_states_gib"] + plan["ema_gib"] + plan["activations_gib"] + plan["frozen_encoders_gib"] + plan["overhead_gib"]
    assert plan["per_gpu_peak_gib"] == pytest.approx(parts, abs=0.03)
    assert plan["ema_gib"] == pytest.approx(4 * plan["trained_params"] / 8 / 2**30, abs=0.01)
    assert cli.main(["train", "--plan-memory", "--config", str(config), "--gpus", "0"]) == 2


def test_temporal_only_training_counts_the_temporal_layers() -> None:
    config = {"num_frames": 25}
    full_trained, full_frozen, _ = memory_plan.parameter_counts(config, "full")
    temporal_trained, temporal_frozen, _ = memory_plan.parameter_counts(config, "temporal")
    assert full_frozen == 0 and full_trained == temporal_trained + temporal_frozen
    assert 0.2 < temporal_trained / full_trained < 0.5  # SVD's temporal layers: roughly a third of the UNet
