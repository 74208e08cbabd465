"""The demo's few-step student (`svd-fast demo --distill`): consistency distillation of the trained UNet with
svd_fast.training.distill (DeepSpeed ZeRO-2), then the teacher's measurements on the student, the UNet work and
time of both in the same run, and the one-step consistency check.

One-step check: from the same initial noise, the relative L2 distance (in latent space) of the student's 1-step
sample and of the teacher's 1-step Euler sample to the teacher's 25-step Euler ODE solution.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from svd_fast.demo import evaluate
from svd_fast.demo.world import ClipSpec, render
from svd_fast.diffusers.consistency_scheduler import SVDConsistencyScheduler
from svd_fast.diffusers.generation import load_optimized_pipeline
from svd_fast.diffusers.sampling_settings import read_sampling_settings
from svd_fast.training.distill import DistillConfig, distill

SVD_DEFAULT_STEPS = 25  # diffusers' StableVideoDiffusionPipeline: 25 steps with guidance 1 -> 3 (a CFG batch of 2)
ODE_REFERENCE_STEPS = 25


def distill_student(teacher: Path, manifest: Path, output_dir: Path, settings: dict[str, Any], seed: int):
    """Distill ``teacher``'s UNet on the manifest's kept clips; returns the TrainResult (export: the student)."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    config = DistillConfig.from_dict(
        {**settings, "model": str(teacher), "output_dir": str(output_dir), "precision": "fp32", "seed": seed,
         "device": "cpu" if not torch.cuda.is_available() else "auto"},
        {"data.path": str(manifest), "data.shuffle": True, "deepspeed.zero_stage": 2, "logging.log_every": 10},
    )  # fmt: skip
    return distill(config)


def load_student(folder: Path):
    """The student pipeline with the scheduler its svd_fast.json names, optimized (sampler "auto": consistency)."""
    scheduler = SVDConsistencyScheduler.from_config(read_sampling_settings(folder)["scheduler_config"])
    return load_optimized_pipeline(folder, progress=False, components={"scheduler": scheduler})


@contextmanager
def unet_timer(pipe):
    """Seconds and calls spent in ``pipe.unet``'s forward while the context is open (a dict, filled in)."""
    record = {"seconds": 0.0, "calls": 0}
    started: list[float] = []
    pre = pipe.unet.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))

    def done(*_):
        record["seconds"] += time.perf_counter() - started.pop()
        record["calls"] += 1

    post = pipe.unet.register_forward_hook(done)
    try:
        yield record
    finally:
        pre.remove()
        post.remove()


def timed_evaluation(pipe, held_out, buckets, speeds, sampling: dict[str, Any], seed: int):
    """evaluate.evaluate with its wall time and UNet time per video: (entries, videos, seconds per video, UNet record)."""
    started = time.perf_counter()
    with unet_timer(pipe) as unet:
        entries, videos = evaluate.evaluate(pipe, held_out, buckets, speeds, sampling, seed)
    return entries, videos, (time.perf_counter() - started) / len(entries), unet


def svd_default_unet_seconds(teacher, first_frame: np.ndarray, bucket: int, sampling: dict[str, Any], seed: int) -> dict[str, float]:
    """UNet seconds and calls of one video with SVD's default sampling (25 Euler steps, guidance 1 -> 3: CFG)."""
    with unet_timer(teacher) as unet:
        teacher(
            Image.fromarray(first_frame), height=first_frame.shape[0], width=first_frame.shape[1],
            num_frames=sampling["num_frames"], num_inference_steps=SVD_DEFAULT_STEPS, min_guidance_scale=1.0,
            max_guidance_scale=3.0, fps=sampling["fps"], motion_bucket_id=bucket,
            noise_aug_strength=sampling["noise_aug_strength"], generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        )  # fmt: skip
    return unet


def one_step_consistency(teacher, student, frames: list[np.ndarray], bucket: int, sampling: dict[str, Any], seed: int) -> dict[str, Any]:
    """Relative L2 to the teacher's 25-step ODE solution: the student's 1-step sample and the teacher's 1-step Euler
    sample, from the same initial noise (median over ``frames``)."""
    def latents(pipe, image, steps: int) -> torch.Tensor:
        return pipe(
            Image.fromarray(image), height=image.shape[0], width=image.shape[1], num_frames=sampling["num_frames"],
            num_inference_steps=steps, min_guidance_scale=sampling["guidance"], max_guidance_scale=sampling["guidance"],
            fps=sampling["fps"], motion_bucket_id=bucket, noise_aug_strength=sampling["noise_aug_strength"],
            generator=torch.Generator().manual_seed(seed), output_type="latent",
        ).frames.double()  # fmt: skip

    student_errors, teacher_errors = [], []
    for image in frames:
        reference = latents(teacher, image, ODE_REFERENCE_STEPS)
        scale = reference.norm().item()
        student_errors.append((latents(student, image, 1) - reference).norm().item() / scale)
        teacher_errors.append((latents(teacher, image, 1) - reference).norm().item() / scale)
    student_error, teacher_error = float(np.median(student_errors)), float(np.median(teacher_errors))
    return {
        "student_1_step_relative_l2": round(student_error, 4),
        "teacher_1_step_euler_relative_l2": round(teacher_error, 4),
        "ratio": round(student_error / teacher_error, 4),
        "target_ratio<=1/3": student_error <= teacher_error / 3,
        "first_frames": len(frames),
    }


def evaluate_student(
    student_folder: Path, teacher_folder: Path, held_out: list[ClipSpec], buckets: dict[str, int], speeds: dict[str, float],
    sampling: dict[str, Any], student_steps: int, seed: int, progress: Callable[[str], None],
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:  # fmt: skip
    """The ``distilled`` summary entry and the student's videos (per held-out frame, by speed)."""
    teacher = load_optimized_pipeline(teacher_folder, progress=False)
    student = load_student(student_folder)
    progress("evaluate the teacher at its demo setting and at 4 Euler steps, the student at its steps")
    teacher_entries, _, teacher_seconds, teacher_unet = timed_evaluation(teacher, held_out, buckets, speeds, sampling, seed)
    euler_4 = {**sampling, "sample_steps": student_steps}
    euler_entries, _, _, _ = timed_evaluation(teacher, held_out, buckets, speeds, euler_4, seed)
    student_sampling = {**sampling, "sample_steps": student_steps, "guidance": 1.0}
    student_entries, videos, student_seconds, student_unet = timed_evaluation(student, held_out, buckets, speeds, student_sampling, seed)
    first = render(replace(held_out[0], speed="fast", speed_px=speeds["fast"]), sampling["num_frames"], sampling["size"])[0]
    progress("one-step consistency and SVD's default sampling (UNet time)")
    frames = [render(replace(spec, speed="fast", speed_px=speeds["fast"]), sampling["num_frames"], sampling["size"])[0] for spec in held_out]
    one_step = one_step_consistency(teacher, student, frames, buckets["high"], sampling, seed)
    default = svd_default_unet_seconds(teacher, first, buckets["high"], sampling, seed)
    videos_count = len(student_entries)
    teacher_evaluations = teacher_unet["calls"] / videos_count * (2 if sampling["guidance"] > 1 else 1)
    student_unet_per_video = student_unet["seconds"] / videos_count
    return {
        "evaluation_summary": evaluate.aggregate(student_entries),
        "evaluation": student_entries,
        "teacher_evaluation_summary": evaluate.aggregate(teacher_entries),
        "teacher_4_step_euler_evaluation_summary": evaluate.aggregate(euler_entries),
        "steps": student_steps,
        "unet_evaluations_per_video": student_unet["calls"] / videos_count,
        "teacher_unet_evaluations_per_video": teacher_evaluations,
        "svd_default_unet_evaluations_per_video": 2 * SVD_DEFAULT_STEPS,
        "generation_seconds": round(student_seconds, 3),
        "teacher_generation_seconds": round(teacher_seconds, 3),
        "unet_seconds_per_video": round(student_unet_per_video, 4),
        "teacher_unet_seconds_per_video": round(teacher_unet["seconds"] / videos_count, 4),
        "svd_default_unet_seconds_per_video": round(default["seconds"], 4),
        "unet_time_speedup_vs_svd_default": round(default["seconds"] / max(student_unet_per_video, 1e-9), 2),
        "one_step": one_step,
    }, videos
