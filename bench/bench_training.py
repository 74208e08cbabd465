"""Training throughput and peak memory of the SVD UNet: DeepSpeed ZeRO-2/3 (with/without svd_fast kernels and
gradient checkpointing) vs a plain PyTorch AdamW loop on the stock diffusers UNet.

Full size (needs CUDA): the diffusers default UNetSpatioTemporalConditionModel config (= SVD's UNet, random
weights), 14 frames at 320x576 (latents 14x4x40x72), bf16, batch 1 per GPU, one process. Each variant runs in
its own subprocess so peak memory is its own. A step = EDM loss (svd_fast.training.edm_loss on random latents and
conditioning) + backward + optimiser step; the frozen VAE/CLIP encoders are not part of the timing.
On a machine without CUDA the script refuses, unless --tiny: the tiny test UNet (8 frames, 8x8 latents) on the
CPU, labelled "tiny-cpu" in the JSON; those numbers say nothing about GPU training.

  python bench/bench_training.py --out bench_training.json               # CUDA, all variants
  python bench/bench_training.py --variants plain zero2_ckpt --steps 5
  python bench/bench_training.py --tiny --steps 3                        # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# name -> (engine, zero stage, svd_fast kernels, gradient checkpointing)
VARIANTS: dict[str, tuple[str, int, bool, bool]] = {
    "plain": ("torch", 0, False, False),
    "plain_ckpt": ("torch", 0, False, True),
    "zero2": ("deepspeed", 2, False, False),
    "zero2_ckpt": ("deepspeed", 2, False, True),
    "zero2_kernels_ckpt": ("deepspeed", 2, True, True),
    "zero3_ckpt": ("deepspeed", 3, False, True),
    "zero3_kernels_ckpt": ("deepspeed", 3, True, True),
}
FULL = {"frames": 14, "latent_hw": (40, 72), "label": "svd-full-14x320x576-bf16"}
TINY = {"frames": 8, "latent_hw": (8, 8), "label": "tiny-cpu"}


def run_variant(name: str, tiny: bool, steps: int, warmup: int, batch_size: int) -> dict:
    import torch  # noqa: PLC0415

    from svd_fast.training.activation_checkpointing import enable_activation_checkpointing  # noqa: PLC0415
    from svd_fast.training.config import TrainConfig  # noqa: PLC0415
    from svd_fast.training.objective import TrainingBatch, edm_loss  # noqa: PLC0415
    from svd_fast.training.setup import apply_svd_fast_kernels, build_deepspeed_config, setup_distributed  # noqa: PLC0415

    engine_kind, stage, kernels, checkpointing = VARIANTS[name]
    geometry = TINY if tiny else FULL
    device = torch.device("cpu" if tiny else "cuda")
    from diffusers import UNetSpatioTemporalConditionModel  # noqa: PLC0415

    torch.manual_seed(0)
    if tiny:
        from svd_fast.diffusers.tiny import TINY_UNET_CONFIG  # noqa: PLC0415

        unet = UNetSpatioTemporalConditionModel(**TINY_UNET_CONFIG)
    else:
        unet = UNetSpatioTemporalConditionModel()  # diffusers' defaults are SVD's UNet
    kernel_status = apply_svd_fast_kernels(unet, kernels) if kernels else "off"
    enable_activation_checkpointing(unet, "all" if checkpointing else "none")
    unet.train()
    dtype = torch.bfloat16
    if engine_kind == "deepspeed":
        setup_distributed(device)
        import deepspeed  # noqa: PLC0415

        config = TrainConfig.from_dict({"precision": "bf16", "data": {"batch_size": batch_size}, "optimizer": {"learning_rate": 1e-5},
                                        "deepspeed": {"zero_stage": stage}})
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
        model, _, _, _ = deepspeed.initialize(model=unet, optimizer=optimizer, config=build_deepspeed_config(config))

        def train_step(batch: TrainingBatch) -> float:
            loss, _ = edm_loss(model, batch, dtype)
            model.backward(loss)
            model.step()
            return loss.item()
    else:
        unet.to(device)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)

        def train_step(batch: TrainingBatch) -> float:
            with torch.autocast(device.type, dtype=dtype):  # fp32 master weights, bf16 compute
                loss, _ = edm_loss(unet, batch, torch.float32)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

    channels = unet.config.out_channels
    h, w = geometry["latent_hw"]
    frames = geometry["frames"]
    generator = torch.Generator().manual_seed(0)

    def make_batch() -> TrainingBatch:
        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=generator).to(device)

        return TrainingBatch(
            latents=rand(batch_size, frames, channels, h, w), cond_latent=rand(batch_size, channels, h, w),
            image_embeds=rand(batch_size, 1, unet.config.cross_attention_dim),
            added_time_ids=torch.tensor([[6.0, 127.0, 0.02]] * batch_size, device=device),
            sigma=torch.exp(0.7 + 1.6 * torch.randn(batch_size, generator=generator)).to(device), noise=rand(batch_size, frames, channels, h, w),
            drop_image=torch.zeros(batch_size, dtype=torch.bool, device=device), drop_latent=torch.zeros(batch_size, dtype=torch.bool, device=device),
        )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    losses = [train_step(make_batch()) for _ in range(warmup)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    losses += [train_step(make_batch()) for _ in range(steps)]
    sync()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "variant": name, "config": geometry["label"], "engine": engine_kind, "zero_stage": stage, "svd_fast_kernels": kernel_status,
        "gradient_checkpointing": checkpointing, "batch_size": batch_size, "steps": steps, "seconds": elapsed,
        "samples_per_s": batch_size * steps / elapsed, "peak_memory_gib": peak,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "losses_finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS), help="which variants (default: all)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="tiny UNet on the CPU (labelled tiny-cpu); needed without CUDA")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON list here (always printed)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1, --warmup >= 0")
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.tiny, args.steps, args.warmup, args.batch_size)))
        return 0
    import torch  # noqa: PLC0415

    if not args.tiny and not torch.cuda.is_available():
        print("bench_training: the full-size benchmark needs CUDA; use --tiny for a labelled CPU run", file=sys.stderr)
        return 2
    results = []
    repo = str(Path(__file__).resolve().parents[1])
    for index, name in enumerate(args.variants):
        env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), MASTER_PORT=str(29600 + index))
        command = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch-size", str(args.batch_size)] + (["--tiny"] if args.tiny else [])
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            results.append({"variant": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"})
        else:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
