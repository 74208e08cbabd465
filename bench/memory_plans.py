"""`svd-fast train --plan-memory` for every shipped GPU config (configs/*.yaml with target_gpu_gib), with and
without validation, in one process (configs that share a shape share their traces), as a Markdown table; and the
on-the-fly encoding the trainer did before vae_encode_chunk (every frame at once, fp32 VAE) for comparison.

    python bench/memory_plans.py            (about 2 minutes of CPU; no GPU)
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from svd_fast.training import TrainConfig, memory_plan  # noqa: E402


def gpus_of(path: Path) -> int:
    """The GPUs a shipped config is written for: its name says so (``..._8gpu_...``), else one."""
    found = re.search(r"_(\d+)gpu", path.stem)
    return int(found.group(1)) if found else 1


def shipped_gpu_configs() -> list[Path]:
    return [path for path in sorted((ROOT / "configs").glob("train_*.yaml")) if TrainConfig.read_file(path).get("device") != "cpu"]


def with_validation(config: TrainConfig) -> TrainConfig:
    return dataclasses.replace(config, validation=dataclasses.replace(config.validation, every=500, images=["first_frame.png"]))


def main() -> None:
    print("| config | GPUs / ZeRO | model states | EMA | frozen enc. | ZeRO buffers | ctx+NCCL+ws | fragm. | activations | vae_encode | "
          "validation | peak | peak with validation | target | margin (with validation) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in shipped_gpu_configs():
        config, gpus = TrainConfig.from_file(path), gpus_of(path)
        plan = memory_plan.plan_memory(config, gpus)
        validated = memory_plan.plan_memory(with_validation(config), gpus)
        fixed = plan.cuda_context_gib + plan.nccl_gib + plan.workspaces_gib
        print(f"| `{path.name}` | {gpus} / {plan.zero_stage} | {plan.model_states_gib} | {plan.ema_gib} | {plan.frozen_encoders_gib} | "
              f"{plan.zero_buffers_gib} | {fixed:.2f} | {plan.fragmentation_gib} | {plan.activations_gib} | {plan.vae_encode_gib} "
              f"({plan.vae_encode_chunk} fr.) | {plan.validation_gib} | **{plan.per_gpu_peak_gib}** | {validated.per_gpu_peak_gib} | "
              f"{plan.target_gpu_gib} | {plan.margin:.1%} ({validated.margin:.1%}) |")
    before = memory_plan.traced_vae_bytes(25, (576, 1024), torch.float32, 25) / memory_plan.GIB
    print(f"\nBefore: the trainer encoded all 25 frames at 576x1024 at once with the fp32 VAE: {before:.2f} GiB traced.")


if __name__ == "__main__":
    main()
