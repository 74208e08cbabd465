"""The VAE decode's share of few-step generation time, and what decode_chunk_size costs in memory and time (CPU).

    python bench/vae_decode_share.py share --model demo|full-size [--size 64] [--frames 25] [--json PATH]
    python bench/vae_decode_share.py chunks [--size 64] [--frames 25] [--chunks 1 2 4 8 14 25] [--json PATH]

share: the optimized pipeline (svd_fast.optimize) generates one video at 4 steps without guidance (a few-step
model: 4 UNet calls at batch 1) and, for the demo, at SVD's default 25 steps with CFG (50 UNet evaluations,
batch 2), in one process; the UNet's forward, the VAE decode and the whole call are timed separately (forward hooks and a
wrapper of vae.decode), so the decode's share is decode / call. "demo" is the demo's architecture (32x32 frames,
8 frames, svd_fast.demo) and "full-size" the random SVD-XT architecture (svd_fast.diffusers.full_size) at a small
frame size: the weights are random, which does not change the time.

chunks: the full-size temporal VAE decoder decodes the same latents at each decode_chunk_size, each in its own
process, so that the peak resident memory above the loaded model (ru_maxrss minus the resident size before
decoding) is that decode's own; seconds are the decode's wall time.
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

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402

import svd_fast  # noqa: E402
from svd_fast.demo import DEMO_UNET_CONFIG  # noqa: E402
from svd_fast.demo.autoencoder import DEMO_VAE_CONFIG  # noqa: E402
from svd_fast.diffusers.full_size import SVD_VAE_CONFIG, random_full_size_pipeline  # noqa: E402
from svd_fast.diffusers.loading import clip_image_processor  # noqa: E402
from svd_fast.diffusers.tiny import SVD_SCHEDULER_CONFIG, TINY_CLIP_CONFIG  # noqa: E402


def demo_pipeline():
    torch.manual_seed(0)
    return StableVideoDiffusionPipeline(
        vae=AutoencoderKLTemporalDecoder(**DEMO_VAE_CONFIG).eval(),
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_CONFIG)).eval(),
        unet=UNetSpatioTemporalConditionModel(**DEMO_UNET_CONFIG).eval(),
        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG),
        feature_extractor=clip_image_processor(),
    )


def time_generation(pipe, size: int, frames: int, steps: int, guidance: float, chunk: int) -> dict[str, float]:
    """Seconds of one generation: the whole call, the UNet's forwards and the VAE decode."""
    spent = {"unet": 0.0, "decode": 0.0}
    started: list[float] = []
    hooks = [
        pipe.unet.register_forward_pre_hook(lambda *_: started.append(time.perf_counter())),
        pipe.unet.register_forward_hook(lambda *_: spent.__setitem__("unet", spent["unet"] + time.perf_counter() - started.pop())),
    ]
    decode = pipe.vae.decode

    def timed_decode(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return decode(*args, **kwargs)
        finally:
            spent["decode"] += time.perf_counter() - begin

    pipe.vae.decode = timed_decode
    image = Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8))
    try:
        begin = time.perf_counter()
        with torch.no_grad():
            pipe(image, height=size, width=size, num_frames=frames, num_inference_steps=steps, min_guidance_scale=guidance,
                 max_guidance_scale=guidance, decode_chunk_size=chunk, generator=torch.Generator().manual_seed(0), output_type="pt")  # fmt: skip
        total = time.perf_counter() - begin
    finally:
        del pipe.vae.decode
        for hook in hooks:
            hook.remove()
    return {"total_s": round(total, 3), "unet_s": round(spent["unet"], 3), "decode_s": round(spent["decode"], 3),
            "decode_share": round(spent["decode"] / total, 3)}  # fmt: skip


def share(model: str, size: int, frames: int) -> list[dict]:
    if model == "demo":
        pipe, size, frames = demo_pipeline(), 32, 8
    else:
        pipe = random_full_size_pipeline("svd-xt", dtype=torch.float32, device="cpu")
    svd_fast.optimize(pipe)
    time_generation(pipe, size, frames, 1, 1.0, frames)  # warm-up: first-call allocations and lazy inits
    rows = []
    settings = [(4, 1.0, "4 steps, no CFG (few-step model)")]
    if model == "demo":  # the full-size UNet's 50 evaluations take too long on the 2-core machine
        settings.append((25, 3.0, "25 steps with CFG (SVD default)"))
    for steps, guidance, label in settings:
        rows.append({"model": model, "size": size, "frames": frames, "setting": label, "decode_chunk_size": frames,
                     **time_generation(pipe, size, frames, steps, guidance, frames)})  # fmt: skip
    return rows


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def decode_once(size: int, frames: int, chunk: int) -> dict:
    """In this process: the full-size temporal VAE decodes ``frames`` latents of ``size // 8`` in chunks."""
    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG).eval()
    latents = torch.randn(frames, 4, size // 8, size // 8)
    with torch.no_grad():
        vae.decode(latents[:1], num_frames=1)  # warm-up
        before = _resident_bytes()
        begin = time.perf_counter()
        for start in range(0, frames, chunk):
            part = latents[start : start + chunk]
            vae.decode(part, num_frames=part.shape[0])
        seconds = time.perf_counter() - begin
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"decode_chunk_size": chunk, "seconds": round(seconds, 3), "peak_above_model_mib": round((peak - before) / 2**20, 1)}


def chunks(size: int, frames: int, sizes: list[int]) -> list[dict]:
    rows = []
    for chunk in sizes:
        result = subprocess.run(
            [sys.executable, __file__, "decode-once", "--size", str(size), "--frames", str(frames), "--chunk", str(chunk)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows.append({"size": size, "frames": frames, **json.loads(result.stdout.strip().splitlines()[-1])})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["share", "chunks", "decode-once"])
    parser.add_argument("--model", choices=["demo", "full-size"], default="demo")
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (full-size model)")
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8, 14, 25])
    parser.add_argument("--chunk", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.mode == "decode-once":
        print(json.dumps(decode_once(args.size, args.frames, args.chunk)))
        return 0
    rows = share(args.model, args.size, args.frames) if args.mode == "share" else chunks(args.size, args.frames, args.chunks)
    load = os.getloadavg()
    for row in rows:
        row["load_average_1m"] = round(load[0], 2)
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
