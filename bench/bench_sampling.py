"""Sampling benchmarks on the tiny architecture-true pipeline (CPU): what optimize()'s sampling options buy.

1. End to end and UNet time: the stock pipeline, optimized (fused denoising loop), and optimized with step
   caching (cache_interval=3), same image, noise and steps; the deviation of each from the stock result
   (relative L2 of the final latents).
2. ODE accuracy: Euler and the multistep samplers (ipndm-2, dpmpp-2m) at N steps against a reference solution of the same model,
   conditioning and noise (relative L2 error of the final latents). The reference is DPM-Solver++(2M) (by default
   200 steps, checked against 400); the model is the tiny random pipeline, a trained pipeline folder (e.g. the `svd-fast demo`
   output's pipeline/) or SVD's full-size UNet with random weights. --ode-diffusers-check also compares svd_fast's
   dpmpp-2m with the stock pipeline running diffusers' EDMDPMSolverMultistepScheduler.

Run: PYTHONPATH=. python bench/bench_sampling.py [--steps 25] [--repeats 3] [--frames 8] [--skip-speed]
     [--ode-model tiny-random|full-size|FOLDER --ode-image IMAGE] [--ode-frames 4] [--ode-steps 10 12 15 20 25]
     [--ode-samplers ipndm-2 dpmpp-2m]
Times are medians of --repeats runs. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
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


def _relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return round(float((x.double() - reference.double()).norm() / reference.double().norm()), 6)


def ode_table(
    solve, step_counts: tuple[int, ...], reference_steps: int, check_steps: int, euler_step_counts: tuple[int, ...],
    multistep_samplers: tuple[str, ...] = ("ipndm-2", "dpmpp-2m"),
) -> dict:
    """Euler at each of ``euler_step_counts`` and each of ``multistep_samplers`` at each of ``step_counts`` against a
    ``reference_steps`` DPM-Solver++(2M) solution of the same model, conditioning and noise (relative L2 error of
    the final latents).

    The reference is second order (a first-order reference would carry an O(1/reference_steps) bias that favours
    Euler). Its own error is estimated from the ``check_steps`` solution: for a second-order method it is about
    |x_ref - x_check| / 3 when check_steps = reference_steps / 2, and 4/3 |x_ref - x_check| when check_steps =
    2 reference_steps. ``solve(sampler, steps)`` returns the final latents.
    """
    reference = solve("dpmpp-2m", reference_steps)
    print(f"reference dpmpp-2m@{reference_steps} done", file=sys.stderr, flush=True)
    check = solve("dpmpp-2m", check_steps)
    result = {
        "reference": f"dpmpp-2m@{reference_steps}",
        f"reference_vs_dpmpp-2m@{check_steps}": _relative_error(check, reference),
        "relative_l2_error": {},
    }
    print(f"reference check: {result}", file=sys.stderr, flush=True)
    for sampler, counts in (("euler", euler_step_counts), *((name, step_counts) for name in multistep_samplers)):
        for steps in counts:
            error = _relative_error(solve(sampler, steps), reference)
            result["relative_l2_error"][f"{sampler}@{steps}"] = error
            print(f"{sampler}@{steps}: {error}", file=sys.stderr, flush=True)
    errors = result["relative_l2_error"]
    if "euler@25" in errors:
        euler_25 = errors["euler@25"]
        for sampler in multistep_samplers:
            result[f"{sampler}_steps_within_euler@25"] = [steps for steps in step_counts if errors[f"{sampler}@{steps}"] <= euler_25]
    return result


def pipeline_solver(pipe, image, size: tuple[int, int], frames: int, guidance: tuple[float, float], **call):
    """``solve(sampler, steps)`` on a diffusers pipeline optimized with ``sampler``: the same image, conditioning
    noise and initial latents for every call."""
    height, width = size
    noise = torch.randn(1, frames, 4, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor,
                        generator=torch.Generator().manual_seed(1))  # fmt: skip

    def solve(sampler: str, steps: int) -> torch.Tensor:
        svd_fast.optimize(pipe, sampler=sampler)
        try:
            return pipe(
                image, height=height, width=width, num_frames=frames, num_inference_steps=steps, latents=noise,
                min_guidance_scale=guidance[0], max_guidance_scale=guidance[1],
                generator=torch.Generator().manual_seed(0), output_type="latent", **call,
            ).frames  # fmt: skip
        finally:
            svd_fast.restore(pipe)

    solve.noise = noise
    return solve


def diffusers_dpmpp_2m_check(pipe, solve, image, size, frames, guidance, step_counts, **call) -> dict:
    """svd_fast's dpmpp-2m against the stock pipeline with diffusers' EDMDPMSolverMultistepScheduler (the same
    EDM v-prediction preconditioning, Karras sigmas and DPM-Solver++(2M) with a first-order last step)."""
    from diffusers import EDMDPMSolverMultistepScheduler  # noqa: PLC0415

    config = pipe.scheduler.config
    original = pipe.scheduler
    pipe.scheduler = EDMDPMSolverMultistepScheduler(
        sigma_min=config.sigma_min, sigma_max=config.sigma_max, sigma_data=1.0, sigma_schedule="karras",
        prediction_type="v_prediction", rho=7.0, solver_order=2, algorithm_type="dpmsolver++",
        final_sigmas_type="zero",
    )  # fmt: skip
    height, width = size
    try:
        stock = {
            steps: pipe(
                image, height=height, width=width, num_frames=frames, num_inference_steps=steps,
                latents=solve.noise, min_guidance_scale=guidance[0], max_guidance_scale=guidance[1],
                generator=torch.Generator().manual_seed(0), output_type="latent", **call,
            ).frames
            for steps in step_counts
        }  # fmt: skip
    finally:
        pipe.scheduler = original
    differences = {f"@{steps}": _relative_error(solve("dpmpp-2m", steps), stock[steps]) for steps in step_counts}
    return {"svd_fast_dpmpp-2m_vs_diffusers_EDMDPMSolverMultistepScheduler": differences}


def full_size_solver(size: tuple[int, int], frames: int, guidance: tuple[float, float], seed: int = 0):
    """``solve(sampler, steps)`` on SVD's full-size UNet (random weights, float32, CPU) with random conditioning
    (image embedding, first-frame latents), SVD's added time ids (fps 6, motion 127, noise_aug 0.02), through
    svd_fast.sampling.sample: the loop the optimized pipeline runs, without the VAE and the image encoder."""
    from diffusers import UNetSpatioTemporalConditionModel  # noqa: PLC0415

    from svd_fast.sampling import edm_timesteps, frame_guidance, init_noise_sigma, karras_sigmas, sample  # noqa: PLC0415

    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(num_frames=14).eval()
    height, width = size[0] // 8, size[1] // 8
    generator = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(1, frames, 4, height, width, generator=generator)
    image_latents = torch.randn(1, 4, height, width, generator=generator)
    embedding = torch.randn(1, 1, 1024, generator=generator)
    weights = frame_guidance(frames, guidance[0], guidance[1], batch_size=1)
    do_cfg = guidance[1] > 1.0
    embeddings = torch.cat([torch.zeros_like(embedding), embedding]) if do_cfg else embedding
    time_ids = torch.tensor([[6.0, 127.0, 0.02]]).repeat(embeddings.shape[0], 1)

    def solve(sampler: str, steps: int) -> torch.Tensor:
        sigmas = karras_sigmas(steps)
        timesteps = edm_timesteps(sigmas)

        def unet_step(model_input: torch.Tensor, step: int) -> torch.Tensor:
            return unet(model_input, timesteps[step], embeddings, time_ids, return_dict=False)[0]

        x = noise * init_noise_sigma(sigmas)
        return sample(unet_step, x, image_latents, sigmas, weights if do_cfg else None, sampler=sampler)

    return solve


def _ode(args) -> dict:
    guidance = tuple(args.ode_guidance)
    steps = tuple(args.ode_steps)
    if args.ode_model == "full-size":
        size = (args.ode_size, args.ode_size)
        solve = full_size_solver(size, args.ode_frames, guidance)
        report = {"model": "full-size SVD UNet, random weights, random conditioning", "size": size}
    else:
        if args.ode_model == "tiny-random":
            pipe, image, size = tiny_pipeline(seed=0), _image(), (TINY_HEIGHT, TINY_WIDTH)
        else:
            from diffusers import StableVideoDiffusionPipeline  # noqa: PLC0415

            pipe = StableVideoDiffusionPipeline.from_pretrained(args.ode_model, dtype=torch.float32)
            image = Image.open(args.ode_image).convert("RGB")
            size = (image.height, image.width)
        pipe.set_progress_bar_config(disable=True)
        call = {"motion_bucket_id": args.ode_motion_bucket_id}
        solve = pipeline_solver(pipe, image, size, args.ode_frames, guidance, **call)
        report = {"model": args.ode_model, "size": size}
        if args.ode_diffusers_check:
            report.update(diffusers_dpmpp_2m_check(pipe, solve, image, size, args.ode_frames, guidance, steps, **call))
            print(report, file=sys.stderr, flush=True)
    report.update({"frames": args.ode_frames, "guidance": guidance})
    euler_steps = tuple(args.ode_euler_steps or steps)
    report.update(ode_table(solve, steps, args.ode_reference_steps, args.ode_check_steps, euler_steps, tuple(args.ode_samplers)))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-ode", action="store_true")
    ode = parser.add_argument_group("ODE accuracy")
    ode.add_argument("--ode-model", default="tiny-random", help="tiny-random, full-size, or a diffusers SVD pipeline folder")
    ode.add_argument("--ode-image", help="the conditioning image (pipeline folders); its size is the video's")
    ode.add_argument("--ode-size", type=int, default=64, help="full-size: frame side in pixels")
    ode.add_argument("--ode-frames", type=int, default=4)
    ode.add_argument("--ode-guidance", type=float, nargs=2, default=[1.0, 3.0], metavar=("MIN", "MAX"))
    ode.add_argument("--ode-motion-bucket-id", type=int, default=127)
    ode.add_argument("--ode-steps", type=int, nargs="+", default=[10, 12, 15, 20, 25])
    ode.add_argument("--ode-samplers", nargs="+", default=["ipndm-2", "dpmpp-2m"], choices=["ipndm-2", "dpmpp-2m"],
                     help="the multistep samplers compared with Euler")
    ode.add_argument("--ode-euler-steps", type=int, nargs="+", help="Euler's step counts (default: --ode-steps)")
    ode.add_argument("--ode-reference-steps", type=int, default=200)
    ode.add_argument("--ode-check-steps", type=int, default=400)
    ode.add_argument("--ode-diffusers-check", action="store_true", help="compare dpmpp-2m with diffusers' scheduler")
    args = parser.parse_args()
    if args.ode_model not in ("tiny-random", "full-size") and not args.ode_image:
        parser.error("--ode-model FOLDER needs --ode-image")
    report = {"machine": {"torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()}}
    with torch.no_grad():
        if not args.skip_speed:
            pipe = tiny_pipeline(seed=0)
            pipe.set_progress_bar_config(disable=True)
            report.update({"steps": args.steps, "frames": args.frames})
            report["speed"] = speed(pipe, _image(), args.steps, args.frames, args.repeats)
        if not args.skip_ode:
            report["ode"] = _ode(args)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
