"""`svd-fast demo`: the SVD story on a small world that a CPU can learn in minutes.

curate (drop static clips, split at cuts, motion_bucket_id from the motion score) -> train a small
temporal-decoder VAE on the frames -> train a small SVD UNet under DeepSpeed ZeRO-2 with the SVD objective on its
latents, conditioned on the first frame and motion_bucket_id -> generate from held-out first frames at the low and
the high bucket with the optimized pipeline -> measure where the disk went against the ground truth.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from svd_fast import _io
from svd_fast.demo import distill
from svd_fast.diffusers.tiny import TINY_UNET_CONFIG

# Smaller than the tiny model: 8x8x4 latents of 32x32 frames, narrow blocks, one head per attention.
DEMO_UNET_CONFIG: dict[str, object] = {
    **TINY_UNET_CONFIG,
    "sample_size": 8,
    "block_out_channels": (32, 64),
    "num_attention_heads": (1, 1),
}


@dataclass(frozen=True)
class DemoSettings:
    size: int = 32  # frame side in pixels; speeds are 1 and 4 px/frame at 64x64
    num_frames: int = 8
    fps: int = 8
    # Four times apart (0.5 and 1.5 px/frame did not teach motion_bucket_id in 800 steps: the UNet moved every disk
    # at the average speed); 2 px/frame keeps a fast disk inside the frame for 8 frames.
    speeds: dict[str, float] = field(default_factory=lambda: {"slow": 0.5, "fast": 2.0})
    reels: int = 12  # training files, each a run of scenes joined by hard cuts
    scenes_per_reel: int = 16
    vae_steps: int = 400
    vae_learning_rate: float = 1e-3
    vae_clips_per_step: int = 1
    unet_steps: int = 1100  # 800 learnt the direction but moved both buckets alike (1.16x); 1100: 2.9x
    unet_batch_size: int = 4
    unet_learning_rate: float = 1e-3
    sample_steps: int = 12
    guidance: float = 1.0  # 1: no classifier-free guidance (half the UNet work); the motion bucket is never dropped
    noise_aug_strength: float = 0.05  # exp(-3): the training objective's typical conditioning noise
    held_out: int = 8
    # `--distill`: consistency distillation of the trained UNet into a student sampled in student_steps steps.
    distill: bool = False
    distill_steps: int = 300
    distill_batch_size: int = 4
    distill_learning_rate: float = 2e-4
    student_steps: int = 4
    distill_skip_steps: int = 10  # the student's own step gap on the 40-level grid: i -> i + 10 in one teacher step

    def distillation(self) -> dict[str, Any]:
        """svd_fast.training.distill.DistillConfig sections for the student (the teacher: the trained pipeline)."""
        return {
            "max_steps": self.distill_steps,
            "data": {"num_frames": self.num_frames, "height": self.size, "width": self.size, "batch_size": self.distill_batch_size},
            "optimizer": {"learning_rate": self.distill_learning_rate, "warmup_steps": min(20, self.distill_steps // 10)},
            "distill": {
                "num_train_timesteps": 40, "skip_steps": self.distill_skip_steps, "teacher_solver": "ipndm-2",
                "teacher_min_guidance": self.guidance, "teacher_max_guidance": self.guidance, "loss": "pseudo-huber",
                "target_ema_decay": 0.95, "student_steps": self.student_steps,
            },
        }  # fmt: skip

    def unet_training(self) -> dict[str, Any]:
        """svd_fast.training.TrainConfig sections for the UNet."""
        return {
            "max_steps": self.unet_steps,
            "ema_decay": 0.99 if self.unet_steps >= 200 else 0.0,
            "data": {"num_frames": self.num_frames, "height": self.size, "width": self.size, "batch_size": self.unet_batch_size},
            "optimizer": {"learning_rate": self.unet_learning_rate, "warmup_steps": min(20, self.unet_steps // 10)},
            "objective": {
                # Less noise than SVD's ln(sigma) ~ N(0.7, 1.6^2), which is tuned for 576x1024 frames: the optimal
                # noise level falls with resolution, and 8x8 latents need the low levels learnt too. Centred at
                # sigma 1 (not lower): the speed is decided at the high levels, where only motion_bucket_id tells it.
                "p_mean": 0.0,
                "p_std": 1.4,
                # Only the pipeline's unconditional case (image embedding and first-frame latent both zero) is
                # dropped, so classifier-free guidance works and the conditional model gets every other sample.
                "drop_image_embedding": 0.0,
                "drop_both": 0.1,
                "drop_cond_latent": 0.0,
            },
        }

    def sampling(self) -> dict[str, Any]:
        return {
            "size": self.size, "num_frames": self.num_frames, "fps": self.fps, "sample_steps": self.sample_steps,
            "guidance": self.guidance, "noise_aug_strength": self.noise_aug_strength,
        }


# The test suite's end-to-end check: every stage and output, in well under two minutes; it does not learn.
QUICK = DemoSettings(reels=1, scenes_per_reel=8, vae_steps=3, unet_steps=3, unet_batch_size=2, sample_steps=2, distill_steps=2,
                     distill_batch_size=2)

OUTPUT_FILES = (
    "generated_slow.mp4", "generated_fast.mp4", "reference_slow.mp4", "reference_fast.mp4", "first_frame.png",
    "comparison.png", "motion.png", "loss.png", "manifest.parquet", "summary.json", "pipeline",
)


class StageTimer:
    """Times named stages and reports progress, so a user sees where the demo is."""

    def __init__(self, progress: Callable[[str], None]) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}
        # CPU time as well as wall time: on a shared machine the wall time says more about the neighbours.
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.progress(f"{name} ...")
        started, cpu_started = time.perf_counter(), time.process_time()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 2)
        self.cpu_seconds[name] = round(time.process_time() - cpu_started, 2)
        self.progress(f"{name} done in {self.seconds[name]:.1f} s ({self.cpu_seconds[name]:.1f} CPU s)")


def run_demo(out: Path, settings: DemoSettings, seed: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """Run every stage into ``out`` (an empty or new folder); returns the summary also written to summary.json."""
    import torch  # noqa: PLC0415 - torch loads only when the command runs (fast --help)

    import svd_fast  # noqa: PLC0415 - torch and diffusers load only when the demo runs
    from svd_fast.demo import autoencoder, evaluate, outputs, train, world  # noqa: PLC0415 - torch, diffusers and deepspeed load only when the demo runs
    from svd_fast.diffusers.generation import load_optimized_pipeline  # noqa: PLC0415 - diffusers loads only when a model is built

    _io.claim_folder(out, "demo")
    work = out / "work"  # inputs and intermediates; the results sit at the top of ``out``
    timer = StageTimer(progress)
    summary: dict[str, Any] = {"settings": asdict(settings), "seed": seed, "device": "cuda" if torch.cuda.is_available() else "cpu"}

    with timer.stage("write training clips"):
        specs = world.write_training_clips(
            work / "clips", settings.reels, settings.scenes_per_reel, settings.num_frames, settings.size, settings.fps, settings.speeds, seed
        )
    with timer.stage("curate"):
        # Curation keeps its resumable parts beside its manifest: both stay in work/, the manifest is copied out.
        manifest = work / "manifest.parquet"
        summary["curation"] = train.curate_clips(work / "clips", manifest)
        _io.write_file(out / "manifest.parquet", lambda temporary: shutil.copyfile(manifest, temporary))
        joined = train.join_ground_truth(manifest, specs)
        buckets = train.motion_buckets(joined)
        summary["motion_buckets"] = buckets
    moving = [spec for spec in specs if spec.speed != "static"]
    clips = np.stack([world.render(spec, settings.num_frames, settings.size) for spec in moving])
    with timer.stage("train autoencoder"):
        vae, vae_losses, _ = autoencoder.train_autoencoder(
            clips, settings.vae_steps, settings.vae_learning_rate, settings.vae_clips_per_step, seed, progress
        )
        held_out = world.held_out_specs(settings.held_out, settings.num_frames, settings.size, settings.speeds, seed)
        held_out_clips = np.stack([world.render(replace(spec, speed_px=settings.speeds["fast"]), settings.num_frames, settings.size) for spec in held_out])
        summary["autoencoder"] = {
            "steps": settings.vae_steps,
            "final_weighted_reconstruction_mse": round(float(np.mean(vae_losses[-10:])), 6),
            "held_out_reconstruction_psnr": round(autoencoder.reconstruction_psnr(vae, held_out_clips), 2),
            "scaling_factor": round(float(vae.config.scaling_factor), 5),
        }
        base_model = autoencoder.save_base_pipeline(work / "base_model", vae, DEMO_UNET_CONFIG, seed)
    with timer.stage("train UNet (DeepSpeed ZeRO-2)"):
        result = train.train_unet(base_model, manifest, work / "train", settings.unet_training(), seed)
        summary["training"] = {
            "steps": result.steps,
            "samples_per_second": round(result.samples_per_second, 3),
            "kernels": result.kernel_status,
            "first_50_mean_loss": round(float(np.mean(result.losses[:50])), 5),
            "last_50_mean_loss": round(float(np.mean(result.losses[-50:])), 5),
        }
        pipeline = out / "pipeline"
        if pipeline.exists():
            shutil.rmtree(pipeline)
        shutil.move(str(result.export_path), pipeline)
        outputs.plot_losses(out / "loss.png", {"autoencoder: reconstruction MSE (disk pixels x10)": vae_losses, "UNet: EDM loss (SVD objective)": result.losses})
    with timer.stage("generate and evaluate"):
        pipe = load_optimized_pipeline(pipeline, progress=False)
        entries, all_videos = evaluate.evaluate(pipe, held_out, buckets, settings.speeds, settings.sampling(), seed)
        summary["evaluation"] = entries
        summary["evaluation_summary"] = evaluate.aggregate(entries)
        summary["background_drift"] = summary["evaluation_summary"]["background_drift"]
        # The pictures show the typical held-out frame (median high/low ratio), not the first or the best one.
        example = evaluate.median_example(entries)
        videos = all_videos[example]
        for speed, pair in videos.items():
            outputs.write_video(out / f"generated_{speed}.mp4", pair["generated"], settings.fps)
            outputs.write_video(out / f"reference_{speed}.mp4", pair["reference"], settings.fps)
        outputs.write_png(out / "first_frame.png", videos["slow"]["reference"][0])
        outputs.plot_motion(out / "motion.png", entries, buckets)
        rows = [
            ("reference\nslow", videos["slow"]["reference"]),
            (f"generated\nbucket {buckets['low']}", videos["slow"]["generated"]),
            ("reference\nfast", videos["fast"]["reference"]),
            (f"generated\nbucket {buckets['high']}", videos["fast"]["generated"]),
        ]
    if settings.distill:
        with timer.stage("distill a 4-step student (DeepSpeed ZeRO-2)"):
            student = distill.distill_student(pipeline, manifest, work / "distill", settings.distillation(), seed)
        with timer.stage("evaluate the student"):
            distilled, student_videos = distill.evaluate_student(
                student.export_path, pipeline, held_out, buckets, settings.speeds, settings.sampling(), settings.student_steps,
                seed, progress,
            )  # fmt: skip
        distilled["distill_seconds"] = timer.seconds["distill a 4-step student (DeepSpeed ZeRO-2)"]
        distilled["distill_last_50_mean_loss"] = round(float(np.mean(student.losses[-50:])), 6)
        summary["distilled"] = distilled
        rows += [(f"student {settings.student_steps} steps\nbucket {buckets['low']}", student_videos[example]["slow"]["generated"]),
                 (f"student {settings.student_steps} steps\nbucket {buckets['high']}", student_videos[example]["fast"]["generated"])]
    outputs.plot_comparison(out / "comparison.png", rows)
    summary["stage_seconds"] = timer.seconds
    summary["stage_cpu_seconds"] = timer.cpu_seconds
    summary["total_seconds"] = round(sum(timer.seconds.values()), 2)
    summary["load_average"] = list(os.getloadavg())
    summary["backends_used"] = svd_fast.backends_used()
    summary["example"] = {
        "colour": held_out[example].colour, "first_frame": held_out[example].name,
        "high_over_low_displacement": evaluate.high_over_low(entries, held_out[example].name),
        "chosen_as": f"the median high/low displacement ratio of the {len(held_out)} held-out first frames (the lower middle one)",
    }
    summary["outputs"] = list(OUTPUT_FILES)
    outputs.write_json(out / "summary.json", summary)
    return summary


def seed_row(summary: dict[str, Any], folder: str) -> dict[str, Any]:
    """One seed's line of the seed table: the targets' measurements, whether each is met, and what it cost."""
    measured = summary["evaluation_summary"]
    return {
        "seed": summary["seed"],
        "folder": folder,
        **{key: measured[key] for key in ("median_angle_error_deg", "high_over_low_displacement", "median_psnr_first_frame", "median_psnr_mean")},
        "background_drift": summary["background_drift"],
        "targets": measured["targets"],
        "all_targets_met": all(measured["targets"].values()),
        "motion_buckets": {key: summary["motion_buckets"][key] for key in ("low", "high", "fast_above_slow_fraction")},
        "autoencoder_held_out_psnr": summary["autoencoder"]["held_out_reconstruction_psnr"],
        "unet_last_50_mean_loss": summary["training"]["last_50_mean_loss"],
        "total_seconds": summary["total_seconds"],
        "total_cpu_seconds": round(sum(summary["stage_cpu_seconds"].values()), 2),
        "load_average": summary["load_average"],
    }


def run_seeds(out: Path, settings: DemoSettings, seeds: list[int], progress: Callable[[str], None]) -> dict[str, Any]:
    """Full demo runs at ``seeds``, one after another: the first into ``out``, each other into ``out/seed_N``.
    With more than one seed, ``out``'s summary.json adds ``seed_table`` (rewritten after every run, so an
    interrupted sweep keeps the seeds it finished). Returns the first seed's summary."""
    first, table = None, []
    for seed in seeds:
        folder = out if not table else out / f"seed_{seed}"
        summary = run_demo(folder, settings, seed, lambda line, seed=seed: progress(f"seed {seed}: {line}" if len(seeds) > 1 else line))
        first = first or summary
        table.append(seed_row(summary, str(folder.relative_to(out)) if folder != out else "."))
        if len(seeds) > 1:
            first["seed_table"] = table
            _io.write_json(out / "summary.json", first)
    return first
