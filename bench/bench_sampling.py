"""Sampling benchmarks on the tiny architecture-true pipeline (CPU): what optimize()'s sampling options buy.

1. End to end and UNet time: the stock pipeline, optimized (fused denoising loop), and optimized with step
   caching (cache_interval=3), same image, noise and steps; the deviation of each from the stock result
   (relative L2 of the final latents).
2. ODE accuracy: Euler and DPM-Solver++(2M) at N steps against a 200-step Euler reference of the same model,
   conditioning and noise (relative L2 error of the final latents).

Run: PYTHONPATH=. python bench/bench_sampling.py [--steps 25] [--repeats 3] [--frames 8] [--ode-frames 4]
Times are medians of --repeats runs. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

import svd_fast
import svd_fast.diffusers.denoising_loop as denoising_loop
from svd_fast.diffusers.tiny import TINY_HEIGHT, TINY_WIDTH, tiny_pipeline


def _image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((TINY_HEIGHT, TINY_WIDTH, 3)) * 255).astype(np.uint8))


def _timed_run(pipe, image, steps: int, frames: int) -> tuple[torch.Tensor, float, float]:
    """(latents, seconds end to end, seconds in the denoising loop's UNet calls)."""
    unet_seconds = [0.0]
    original_forward = pipe.unet.forward
    original_sample = denoising_loop.sample

    def timed_forward(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original_forward(*args, **kwargs)
        finally:
            unet_seconds[0] += time.perf_counter() - start

    def timed_sample(model, *args, **kwargs):
        def timed_model(model_input, step):
            start = time.perf_counter()
            try:
                return model(model_input, step)
            finally:
                unet_seconds[0] += time.perf_counter() - start

        return original_sample(timed_model, *args, **kwargs)

    optimized = bool(svd_fast.describe(pipe))
    if optimized:
        denoising_loop.sample = timed_sample
    else:
        pipe.unet.forward = timed_forward
    try:
        start = time.perf_counter()
        latents = pipe(
            image, height=TINY_HEIGHT, width=TINY_WIDTH, num_frames=frames, num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0), output_type="latent",
        ).frames  # fmt: skip
        total = time.perf_counter() - start
    finally:
        denoising_loop.sample = original_sample
        vars(pipe.unet).pop("forward", None)
    return latents, total, unet_seconds[0]


def speed(pipe, image, steps: int, frames: int, repeats: int) -> dict:
    configurations = {"stock": None, "optimized": {}, "optimized cache_interval=3": {"cache_interval": 3}}
    results, reference = {}, None
    for name, options in configurations.items():
        if options is not None:
            svd_fast.optimize(pipe, **options)
        try:
            runs = [_timed_run(pipe, image, steps, frames) for _ in range(repeats)]
        finally:
            if options is not None:
                svd_fast.restore(pipe)
        latents = runs[0][0]
        reference = latents if reference is None else reference
        results[name] = {
            "end_to_end_s": round(statistics.median(r[1] for r in runs), 3),
            "unet_s": round(statistics.median(r[2] for r in runs), 3),
            "relative_deviation_from_stock": float((latents - reference).norm() / reference.norm()),
        }
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    stock = results["stock"]
    for result in results.values():
        result["end_to_end_speedup"] = round(stock["end_to_end_s"] / result["end_to_end_s"], 2)
        result["unet_speedup"] = round(stock["unet_s"] / result["unet_s"], 2)
    return results


def ode_accuracy(pipe, image, frames: int, step_counts: tuple[int, ...], reference_steps: int = 200) -> dict:
    noise = torch.randn(1, frames, 4, TINY_HEIGHT // pipe.vae_scale_factor, TINY_WIDTH // pipe.vae_scale_factor,
                        generator=torch.Generator().manual_seed(1))  # fmt: skip

    def final(steps: int, sampler: str) -> torch.Tensor:
        svd_fast.optimize(pipe, sampler=sampler)
        try:
            return pipe(
                image, height=TINY_HEIGHT, width=TINY_WIDTH, num_frames=frames, num_inference_steps=steps,
                latents=noise, generator=torch.Generator().manual_seed(0), output_type="latent",
            ).frames  # fmt: skip
        finally:
            svd_fast.restore(pipe)

    reference = final(reference_steps, "euler")
    print(f"reference euler@{reference_steps} done", file=sys.stderr, flush=True)
    errors = {}
    for sampler, counts in (("euler", step_counts), ("dpmpp-2m", step_counts)):
        for steps in counts:
            errors[f"{sampler}@{steps}"] = round(float((final(steps, sampler) - reference).norm() / reference.norm()), 6)
            print(f"{sampler}@{steps}: {errors[f'{sampler}@{steps}']}", file=sys.stderr, flush=True)
    return {"reference": f"euler@{reference_steps}", "relative_l2_error": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--ode-frames", type=int, default=4)
    parser.add_argument("--ode-steps", type=int, nargs="+", default=[10, 12, 15, 25])
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-ode", action="store_true")
    args = parser.parse_args()
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    image = _image()
    report = {"machine": {"torch_threads": torch.get_num_threads()}, "steps": args.steps, "frames": args.frames}
    with torch.no_grad():
        if not args.skip_speed:
            report["speed"] = speed(pipe, image, args.steps, args.frames, args.repeats)
        if not args.skip_ode:
            report["ode"] = ode_accuracy(pipe, image, args.ode_frames, tuple(args.ode_steps))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
