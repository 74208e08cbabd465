"""The memory plan's activation trace at full size in bf16 on the CPU, for one UNet block stack: SVD's mid block
(UNetMidBlockSpatioTemporal, 1280 channels, 185.6M parameters) at SVD-XT's 25 frames and its 9x16 latent grid of
576x1024, one forward + backward with every parameter trained (gradients dropped once accumulated, as the plan
traces them). Traced: svd_fast.training.memory_plan.LiveBytesTracker on fake tensors. Measured: the peak resident
memory of a fresh process over its resident memory before the pass (as tests/test_memory_plan.py measures the tiny
UNet: a warm-up pass first, glibc's mmap threshold at 64 KiB so freed tensors leave the resident set).

    python bench/block_memory.py [--mode none|all] [--frames 25]      (about 30 s of CPU and 1.5 GiB)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from svd_fast.training.activation_checkpointing import enable_activation_checkpointing  # noqa: E402
from svd_fast.training.memory_plan import LiveBytesTracker, _built  # noqa: E402

LATENT_HW = (9, 16)  # the mid block's grid at 576x1024 (latents 72x128, three downsamplings)
CHANNELS, CONTEXT = 1280, 1024

MEASUREMENT = textwrap.dedent("""
    import json, sys, torch
    from diffusers import UNetSpatioTemporalConditionModel
    from svd_fast.training.activation_checkpointing import enable_activation_checkpointing
    mode, frames, (height, width) = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    dtype = torch.bfloat16
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel(num_frames=frames)
    block = unet.mid_block.to_empty(device="cpu").to(dtype).train()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    enable_activation_checkpointing(block, mode)
    for p in block.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    def step(f, h, w):
        x = torch.randn(f, 1280, h, w, dtype=dtype)
        out = block(x, torch.randn(f, 1280, dtype=dtype), encoder_hidden_states=torch.randn(f, 1, 1024, dtype=dtype),
                    image_only_indicator=torch.zeros(1, f, dtype=dtype))
        out.float().square().mean().backward()
    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
    step(1, 4, 4)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    step(frames, height, width)
    print(json.dumps(status("VmHWM:") - before))
""")


def traced(mode: str, frames: int) -> int:
    from diffusers import UNetSpatioTemporalConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype = torch.bfloat16
    with FakeTensorMode():
        block = _built(lambda: UNetSpatioTemporalConditionModel(num_frames=frames), dtype).mid_block.train()
        enable_activation_checkpointing(block, mode)
        for param in block.parameters():
            param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        x = torch.randn(frames, CHANNELS, *LATENT_HW, dtype=dtype)
        temb, context = torch.randn(frames, CHANNELS, dtype=dtype), torch.randn(frames, 1, CONTEXT, dtype=dtype)
        indicator = torch.zeros(1, frames, dtype=dtype)
        tracker = LiveBytesTracker()
        with tracker:
            out = block(x, temb, encoder_hidden_states=context, image_only_indicator=indicator)
            out.float().square().mean().backward()
    return tracker.peak


def measured(mode: str, frames: int) -> int:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run([sys.executable, "-c", MEASUREMENT, mode, str(frames), json.dumps(LATENT_HW)], env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="none", choices=("none", "all"), help="activation checkpointing of the block's resnets/attentions")
    parser.add_argument("--frames", type=int, default=25)
    args = parser.parse_args()
    trace, real = traced(args.mode, args.frames), measured(args.mode, args.frames)
    print(json.dumps({"mode": args.mode, "frames": args.frames, "traced_bytes": trace, "measured_bytes": real, "traced_over_measured": round(trace / real, 3)}))


if __name__ == "__main__":
    main()
